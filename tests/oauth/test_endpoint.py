"""The token endpoint through its ASGI and WSGI faces: RFC 6749 §4.4 and §5.2."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import Iterator, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from keyguard.backends.sqlite import SQLiteKeyStore
from keyguard.errors import ConfigurationError, StorageError
from keyguard.manager import KeyManager
from keyguard.oauth.endpoint import TokenEndpoint
from keyguard.oauth.issuer import TokenIssuer
from keyguard.testing import FakeClock
from tests.adapters.security_support import PEER, SpyMemoryKeyStore

FORM = {"content-type": "application/x-www-form-urlencoded"}


class Server:
    """A key store, a manager, an issuer and the endpoint in one ``face``."""

    def __init__(self, face: str, backend: str = "memory", tmp: Path | None = None) -> None:
        self.face = face
        self.clock = FakeClock()
        self.store: SpyMemoryKeyStore | SQLiteKeyStore = (
            SpyMemoryKeyStore() if backend == "memory" else SQLiteKeyStore((tmp or Path()) / "k.db")
        )
        self.manager = KeyManager(self.store, clock=self.clock)
        self.issuer = TokenIssuer(
            issuer="https://kg.test", audience="https://api.test", clock=self.clock
        )
        self.endpoint = TokenEndpoint(issuer=self.issuer, keys=self.store, clock=self.clock)
        self.created = self.manager.create("client", scopes=["text:generate", "image:*"])
        self.key = self.created.key.reveal()
        self.id = self.created.record.id
        self.responses: list[httpx.Response] = []

    def call(
        self,
        method: str = "POST",
        path: str = "/oauth/token",
        *,
        data: Mapping[str, str] | None = None,
        content: bytes | None = None,
        headers: Mapping[str, str] = FORM,
    ) -> httpx.Response:
        url = "http://testserver" + path
        body = content if content is not None else (None if data is None else _form(data))
        if self.face == "asgi":
            transport = httpx.ASGITransport(self.endpoint.asgi(), client=(PEER, 1234))

            async def send() -> httpx.Response:
                async with httpx.AsyncClient(transport=transport) as client:
                    return await client.request(method, url, content=body, headers=dict(headers))

            response = asyncio.run(send())
        else:
            wsgi = httpx.WSGITransport(self.endpoint.wsgi(), remote_addr=PEER)
            with httpx.Client(transport=wsgi) as client:
                response = client.request(method, url, content=body, headers=dict(headers))
        self.responses.append(response)
        return response

    def grant(self, **extra: str) -> httpx.Response:
        fields = {
            "grant_type": "client_credentials",
            "client_id": self.id,
            "client_secret": self.key,
        }
        fields.update(extra)
        return self.call(data={k: v for k, v in fields.items() if v != "-"})

    def close(self) -> None:
        self.store.close()


def _form(data: Mapping[str, str]) -> bytes:
    return "&".join(f"{quote(k)}={quote(v, safe='')}" for k, v in data.items()).encode()


def basic(client_id: str, secret: str) -> dict[str, str]:
    raw = f"{quote(client_id, safe='')}:{quote(secret, safe='')}".encode()
    return {**FORM, "authorization": "Basic " + base64.b64encode(raw).decode()}


@pytest.fixture(params=["asgi", "wsgi"])
def server(request: pytest.FixtureRequest) -> Iterator[Server]:
    built = Server(str(request.param))
    yield built
    for response in built.responses:  # the canary: the key never comes back
        assert built.key not in response.text
        assert built.key not in str(response.headers)
        assert response.headers["cache-control"] in {"no-store", "public, max-age=300"}
    built.close()


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
@pytest.mark.parametrize("face", ["asgi", "wsgi"])
def test_client_credentials_grant(face: str, backend: str, tmp_path: Path) -> None:
    """Form credentials give a Bearer token with the key's scopes, no-store, 10 minutes."""
    server = Server(face, backend, tmp_path)
    try:
        response = server.grant()
        assert response.status_code == 200
        body = response.json()
        assert body["token_type"] == "Bearer"
        assert body["expires_in"] == 600
        assert body["scope"] == "image:* text:generate"
        assert response.headers["cache-control"] == "no-store"
        assert response.headers["pragma"] == "no-cache"
        claims = server.issuer.validator().validate(body["access_token"], now=server.clock.now())
        assert claims.key_id == server.id
    finally:
        server.close()


def test_basic_authentication_and_a_narrower_scope(server: Server) -> None:
    """HTTP Basic (form-encoded id and secret) works, and a subset of scopes is granted."""
    response = server.call(
        data={"grant_type": "client_credentials", "scope": "image:create text:generate"},
        headers=basic(server.id, server.key),
    )
    assert response.status_code == 200
    assert response.json()["scope"] == "image:create text:generate"


@pytest.mark.parametrize(
    ("fields", "status", "error"),
    [
        ({"grant_type": "-"}, 400, "invalid_request"),
        ({"grant_type": "password"}, 400, "unsupported_grant_type"),
        ({"client_secret": "-"}, 401, "invalid_client"),
        ({"client_id": "-"}, 401, "invalid_client"),
        ({"client_secret": "kg_live_" + "A" * 38}, 401, "invalid_client"),
        ({"client_id": "key_someoneelse"}, 401, "invalid_client"),
        ({"scope": "audio:speech"}, 400, "invalid_scope"),
        ({"scope": "*"}, 400, "invalid_scope"),
        ({"scope": "image:create *"}, 400, "invalid_scope"),
        ({"scope": "BAD SCOPE!"}, 400, "invalid_scope"),
        ({"scope": ""}, 400, "invalid_scope"),
    ],
    ids=[
        "no-grant",
        "password-grant",
        "no-secret",
        "no-id",
        "wrong-secret",
        "id-of-another-key",
        "scope-not-held",
        "scope-wildcard-beyond",
        "scope-mixed",
        "scope-syntax",
        "scope-empty",
    ],
)
def test_rfc_6749_errors(server: Server, fields: dict[str, str], status: int, error: str) -> None:
    """Each refusal is the RFC 6749 §5.2 JSON error with a fixed description."""
    response = server.grant(**fields)
    assert response.status_code == status
    assert response.json()["error"] == error
    assert set(response.json()) == {"error", "error_description"}
    if status == 401:
        assert response.headers["www-authenticate"] == 'Basic realm="oauth"'


def test_malformed_requests(server: Server) -> None:
    """Wrong method, media type, repeated parameters, two auth methods, bad Basic, huge body."""
    assert server.call("GET").status_code == 405
    assert (
        server.call(data={"grant_type": "x"}, headers={"content-type": "application/json"}).json()[
            "error"
        ]
        == "invalid_request"
    )
    repeated = b"grant_type=client_credentials&grant_type=client_credentials"
    assert server.call(content=repeated).json()["error"] == "invalid_request"
    both = server.call(
        data={"grant_type": "client_credentials", "client_secret": server.key},
        headers=basic(server.id, server.key),
    )
    assert both.json()["error"] == "invalid_request"
    broken = server.call(
        data={"grant_type": "client_credentials"}, headers={**FORM, "authorization": "Basic !!!"}
    )
    assert broken.json()["error"] == "invalid_request"
    assert server.call(content=b"x" * 9000).status_code == 413
    assert server.call(content=b"\xff\xfe=1").json()["error"] == "invalid_request"


def test_a_revoked_or_expired_key_gets_no_new_token(server: Server) -> None:
    """Revocation and expiry stop new tokens at once."""
    assert server.grant().status_code == 200
    server.manager.revoke(server.id)
    assert server.grant().json()["error"] == "invalid_client"
    expiring = server.manager.create("soon", expires=timedelta(minutes=1))
    server.clock.advance(61)
    response = server.grant(client_id=expiring.record.id, client_secret=expiring.key.reveal())
    assert response.json()["error"] == "invalid_client"


def test_the_key_ip_allow_list_applies(server: Server) -> None:
    """A key restricted to other addresses cannot mint tokens from this one."""
    fenced = server.manager.create("fenced", ip_allow=["10.0.0.0/8"])
    response = server.grant(client_id=fenced.record.id, client_secret=fenced.key.reveal())
    assert response.status_code == 401


def test_key_store_down_is_503(server: Server) -> None:
    """A failing key store answers 503 temporarily_unavailable with Retry-After."""
    assert isinstance(server.store, SpyMemoryKeyStore)
    server.store.failure = StorageError("down")
    response = server.grant()
    assert response.status_code == 503
    assert response.json()["error"] == "temporarily_unavailable"
    assert response.headers["retry-after"] == "5"


def test_jwks_route_and_other_paths(server: Server) -> None:
    """GET and HEAD serve the public keys; other paths are 404 when standalone."""
    response = server.call("GET", "/.well-known/jwks.json")
    keys: list[dict[str, Any]] = response.json()["keys"]
    assert [k["alg"] for k in keys] == ["ES256"]
    assert all("d" not in k for k in keys)
    assert server.call("HEAD", "/.well-known/jwks.json").content == b""
    assert server.call("POST", "/.well-known/jwks.json").status_code == 405
    assert server.call("GET", "/elsewhere").status_code == 404


def test_no_secret_in_logs(server: Server, caplog: pytest.LogCaptureFixture) -> None:
    """Issuing and refusing log the key id at most, never the key or the token."""
    with caplog.at_level(logging.DEBUG):
        token = server.grant().json()["access_token"]
        server.grant(client_secret=server.key[:-1] + "x")
    logs = "\n".join(f"{r.getMessage()} {r.args!r}" for r in caplog.records)
    assert server.key not in logs
    assert token.split(".")[2] not in logs


def test_bad_endpoint_configuration() -> None:
    """Paths, body limit and realm are checked at construction."""
    clock = FakeClock()
    issuer = TokenIssuer(issuer="https://kg.test", audience="https://api.test", clock=clock)
    store = SpyMemoryKeyStore()
    for options in (
        {"token_path": "oauth/token"},
        {"jwks_path": "/oauth/token"},
        {"max_body": 10},
        {"realm": 'a"b'},
        {"issuer": "not an issuer"},
    ):
        settings: dict[str, Any] = {"issuer": issuer, "keys": store}
        settings.update(options)
        with pytest.raises(ConfigurationError):
            TokenEndpoint(**settings)
    assert json.loads(TokenEndpoint(issuer=issuer, keys=store).error("invalid_request").body)
