"""Fixtures for the OAuth tests: keys made once, and real HTTP servers on loopback."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.oauth.support import Keys, StubServer


@pytest.fixture(scope="session")
def keys() -> Keys:
    """The issuer's and the attacker's keys (RSA generation is slow: made once)."""
    return Keys.make()


@pytest.fixture(scope="module")
def jwks_server() -> Iterator[StubServer]:
    """The identity provider's JWKS endpoint: a real server on 127.0.0.1."""
    server = StubServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def attacker() -> Iterator[StubServer]:
    """A server the attacker controls: any request to it is an SSRF (T33)."""
    server = StubServer()
    yield server
    server.close()


@pytest.fixture
def idp(jwks_server: StubServer, attacker: StubServer, keys: Keys) -> StubServer:
    """The JWKS server reset to the issuer's good key set, and a clean attacker log."""
    jwks_server.reset(keys.jwks())
    attacker.reset({"keys": [keys.attacker_jwk()]})
    return jwks_server
