"""SECURITY.md T47: opaque tokens through RFC 7662 introspection, against a real server."""

from __future__ import annotations

import asyncio
import base64
import logging
from typing import Any

import pytest

from keyguard.backends.memory import MemoryKeyStore
from keyguard.backends.memory_limiter import MemoryRateStore
from keyguard.denials import Denial
from keyguard.errors import ConfigurationError
from keyguard.guard import Allow, Guard
from keyguard.oauth.claims import InvalidToken, TokenUnavailable
from keyguard.oauth.introspection import IntrospectionValidator
from keyguard.request import RequestInfo
from keyguard.testing import FakeClock
from tests.adapters.security_support import PEER, canary
from tests.oauth.support import NOW, StubServer

OPAQUE = "opaque-" + "x" * 40


def active(**changes: Any) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "active": True,
        "client_id": "partner-7",
        "scope": "read write",
        "exp": NOW + 600,
        "iss": "https://as.example.com",
        "aud": "https://api.example.com",
        "token_type": "Bearer",
    }
    answer.update(changes)
    return {k: v for k, v in answer.items() if v is not None}


def validator(server: StubServer, **options: Any) -> IntrospectionValidator:
    settings: dict[str, Any] = {
        "client_id": "resource-server",
        "client_secret": "rs-secret-" + "s" * 20,
        "timeout": 0.3,
        "issuer": "https://as.example.com",
        "audience": "https://api.example.com",
    }
    settings.update(options)
    return IntrospectionValidator(server.url + "/introspect", **settings)


def guard(tokens: IntrospectionValidator, clock: FakeClock) -> Guard:
    return Guard(
        keys=MemoryKeyStore(),
        limiter=MemoryRateStore(clock=clock),
        clock=clock,
        tokens=tokens,
        auth_failures=0,
    )


def bearer(token: str) -> RequestInfo:
    return RequestInfo("GET", "/", ((b"authorization", f"Bearer {token}".encode()),), peer=PEER)


def test_active_token_is_a_client_and_is_sent_only_in_the_body(idp: StubServer) -> None:
    """An active answer gives the client's identity; the token travels in a POST form
    body with HTTP Basic client authentication, never in the URL."""
    idp.reset(active())
    clock = FakeClock(NOW)
    decision = guard(validator(idp), clock).check(bearer(OPAQUE), scope="read")
    assert isinstance(decision, Allow)
    assert decision.identity is not None
    assert decision.identity.key_id == "oauth:partner-7"
    ((method, path, body, headers),) = idp.behaviour.log
    assert (method, path) == ("POST", "/introspect")
    assert OPAQUE not in path
    assert f"token={OPAQUE}".encode() in body
    assert b"token_type_hint=access_token" in body
    expected = base64.b64encode(b"resource-server:rs-secret-" + b"s" * 20).decode()
    assert headers["Authorization"] == f"Basic {expected}"


@pytest.mark.parametrize(
    ("answer", "status"),
    [
        ({"active": False}, 401),
        ({"active": "true"}, 401),
        (active(exp=NOW - 1), 401),
        (active(token_type="refresh_token"), 401),
        (active(iss="https://evil.example.com"), 401),
        (active(aud="https://other.example.com"), 401),
        (active(client_id=None), 401),
        (active(scope=["read"]), 401),
        ([1, 2], 503),
    ],
    ids=[
        "inactive",
        "active-not-boolean",
        "expired",
        "refresh-token",
        "wrong-issuer",
        "wrong-audience",
        "no-client",
        "scope-not-string",
        "not-an-object",
    ],
)
def test_refusals(idp: StubServer, answer: object, status: int) -> None:
    """Inactive or unsuitable answers are 401 invalid_token; junk is 503."""
    idp.reset(answer)
    decision = guard(validator(idp), FakeClock(NOW)).check(bearer(OPAQUE))
    assert isinstance(decision, Denial)
    assert decision.status == status


@pytest.mark.parametrize("mode", ["500", "slow", "junk"])
def test_endpoint_unreachable_is_503(idp: StubServer, mode: str) -> None:
    """Down, slow or broken introspection answers 503 with Retry-After, never 401."""
    idp.reset(active(), mode)
    decision = guard(validator(idp), FakeClock(NOW)).check(bearer(OPAQUE))
    assert isinstance(decision, Denial)
    assert (decision.code, decision.retry_after) == ("token_validation_unavailable", 5.0)


def test_cache_is_bounded_and_never_outlives_exp(idp: StubServer) -> None:
    """Answers are reused within min(cache_ttl, exp), inactive ones never, and the
    LRU holds at most max_entries tokens."""
    idp.reset(active(exp=NOW + 10))
    tokens = validator(idp, max_entries=2)
    tokens.validate(OPAQUE, now=NOW)
    tokens.validate(OPAQUE, now=NOW + 5)
    assert tokens.calls == 1
    with pytest.raises(InvalidToken):
        tokens.validate(OPAQUE, now=NOW + 11)  # past exp: asked again, and expired
    assert tokens.calls == 2
    idp.reset(active())
    for name in ("a", "b", "c"):
        tokens.validate(OPAQUE + name, now=NOW)
    tokens.validate(OPAQUE + "a", now=NOW)  # evicted by "c": asked again
    assert tokens.calls == 6
    idp.reset({"active": False})
    for _ in range(2):
        with pytest.raises(InvalidToken):
            tokens.validate(OPAQUE + "z", now=NOW)
    assert tokens.calls == 8


def test_async_face_and_unavailable(idp: StubServer) -> None:
    """The async path gives the same answer; an unreachable endpoint raises
    TokenUnavailable from the validator itself."""
    idp.reset(active())
    clock = FakeClock(NOW)
    decision = asyncio.run(guard(validator(idp), clock).acheck(bearer(OPAQUE)))
    assert isinstance(decision, Allow)
    idp.reset(None, "500")
    with pytest.raises(TokenUnavailable):
        validator(idp).validate(OPAQUE, now=NOW)


def test_the_token_is_never_logged(idp: StubServer, caplog: pytest.LogCaptureFixture) -> None:
    """No log line, success or failure, holds the token or the client secret."""
    secret = canary()
    with caplog.at_level(logging.DEBUG):
        for mode in ("ok", "500"):
            idp.reset(active(), mode)
            guard(validator(idp, client_secret=secret), FakeClock(NOW)).check(bearer(OPAQUE))
    logs = "\n".join(f"{r.getMessage()} {r.args!r}" for r in caplog.records)
    assert OPAQUE not in logs
    assert secret not in logs
    assert secret not in repr(validator(idp, client_secret=secret))


def test_bad_introspection_configuration(idp: StubServer) -> None:
    """Plain-HTTP endpoints elsewhere, missing credentials and silly bounds are refused."""
    cases: list[tuple[str, dict[str, Any]]] = [
        ("http://as.example.com/introspect", {}),
        (idp.url, {"client_secret": ""}),
        (idp.url, {"cache_ttl": -1}),
        (idp.url, {"max_token_bytes": 1}),
    ]
    for url, options in cases:
        settings: dict[str, Any] = {"client_id": "rs", "client_secret": "s" * 20}
        settings.update(options)
        with pytest.raises(ConfigurationError):
            IntrospectionValidator(url, **settings)
