"""The client-credentials flow end to end, over real HTTP on 127.0.0.1.

Two real servers share one SQLite key store, one limit store and one issuer (as the
processes of one deployment share a database, a Redis and a signing key):

- a FastAPI app under uvicorn: the token endpoint and JWKS (:class:`OAuthASGI`,
  outermost), then :class:`FastAPIKeyGuardMiddleware` with scopes declared by
  ``require``; its validator fetches the JWKS from its own URL, asynchronously;
- a Flask app under werkzeug's threaded server: :class:`OAuthWSGI` and
  :class:`KeyGuardFlask`; its validator fetches the JWKS from the FastAPI server,
  with blocking I/O.

A client asks either one for a token with its key, and calls either one with it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import httpx
import pytest
from fastapi import Depends, FastAPI
from flask import Flask, jsonify
from werkzeug.serving import BaseWSGIServer, make_server

from keyguard.adapters.fastapi import FastAPIKeyGuardMiddleware, require
from keyguard.adapters.flask import KeyGuardFlask, current_identity
from keyguard.backends.memory_limiter import MemoryRateStore
from keyguard.backends.sqlite import SQLiteKeyStore
from keyguard.guard import Guard, Identity
from keyguard.manager import KeyManager
from keyguard.oauth import OAuthASGI, OAuthWSGI, RemoteJWKS, TokenEndpoint, TokenIssuer
from keyguard.plans import Plan
from keyguard.records import LimitOverrides
from tests.oauth.support import UvicornThread

AUDIENCE = "https://api.example.com"
PLANS = {"free": Plan("free", "100/minute")}
GENERATE = require("text:generate")
WHOAMI = require("keys:self")


@dataclass
class Deployment:
    fastapi_url: str
    flask_url: str
    manager: KeyManager
    guards: dict[str, Guard]

    def url(self, app: str) -> str:
        return self.fastapi_url if app == "fastapi" else self.flask_url


def guard_for(
    store: SQLiteKeyStore, limiter: MemoryRateStore, issuer: TokenIssuer, jwks: str
) -> Guard:
    """A guard whose tokens are verified with keys fetched from ``jwks`` over HTTP."""
    validator = issuer.validator(keys=RemoteJWKS(jwks, timeout=2.0))
    return Guard(keys=store, limiter=limiter, plans=PLANS, tokens=validator, auth_failures=0)


def fastapi_app(guard: Guard, issuer: TokenIssuer) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/generate")
    async def generate(caller: Annotated[Identity, Depends(GENERATE)]) -> dict[str, Any]:
        return {"by": caller.key_id, "method": caller.auth_method}

    @app.get("/v1/whoami")
    async def whoami(caller: Annotated[Identity, Depends(WHOAMI)]) -> dict[str, Any]:
        return {"id": caller.key_id, "scopes": list(caller.scopes)}

    app.add_middleware(FastAPIKeyGuardMiddleware, guard=guard)
    app.add_middleware(OAuthASGI, endpoint=TokenEndpoint.from_guard(guard, issuer))
    return app


def flask_app(guard: Guard, issuer: TokenIssuer) -> Flask:
    app = Flask(__name__)
    kg = KeyGuardFlask(app, guard=guard)

    @app.post("/v1/generate")
    @kg.require("text:generate")
    def generate() -> Any:
        caller = current_identity()
        assert caller is not None
        return jsonify(by=caller.key_id, method=caller.auth_method)

    @app.get("/v1/whoami")
    @kg.require("keys:self")
    def whoami() -> Any:
        caller = current_identity()
        assert caller is not None
        return jsonify(id=caller.key_id, scopes=list(caller.scopes))

    app.wsgi_app = OAuthWSGI(TokenEndpoint.from_guard(guard, issuer), app.wsgi_app)  # type: ignore[method-assign]
    return app


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    path: Path = tmp_path_factory.mktemp("e2e") / "keys.db"
    store = SQLiteKeyStore(path)
    limiter = MemoryRateStore()
    issuer = TokenIssuer(issuer="https://keys.example.com", audience=AUDIENCE)
    uvicorn_server = UvicornThread()
    jwks = uvicorn_server.url + "/.well-known/jwks.json"
    guards = {
        "fastapi": guard_for(store, limiter, issuer, jwks),
        "flask": guard_for(store, limiter, issuer, jwks),
    }
    uvicorn_server.serve(fastapi_app(guards["fastapi"], issuer))
    werkzeug_server: BaseWSGIServer = make_server(
        "127.0.0.1", 0, flask_app(guards["flask"], issuer), threaded=True
    )
    thread = threading.Thread(target=werkzeug_server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield Deployment(
            uvicorn_server.url,
            f"http://127.0.0.1:{werkzeug_server.server_port}",
            KeyManager(store),
            guards,
        )
    finally:
        werkzeug_server.shutdown()
        thread.join(10)
        werkzeug_server.server_close()
        uvicorn_server.close()
        store.close()


class Client:
    """A real HTTP client that records every response for the canary check."""

    def __init__(self) -> None:
        self.http = httpx.Client(timeout=5.0, trust_env=False)
        self.seen: list[httpx.Response] = []

    def token(self, base: str, key_id: str, key: str, scope: str | None = None) -> httpx.Response:
        form = {"grant_type": "client_credentials"}
        if scope is not None:
            form["scope"] = scope
        return self._keep(self.http.post(base + "/oauth/token", data=form, auth=(key_id, key)))

    def call(self, base: str, method: str, path: str, credential: str) -> httpx.Response:
        headers = {"authorization": f"Bearer {credential}"}
        if credential.startswith("kg_"):
            headers = {"x-api-key": credential}
        return self._keep(self.http.request(method, base + path, headers=headers))

    def _keep(self, response: httpx.Response) -> httpx.Response:
        self.seen.append(response)
        return response


@pytest.mark.parametrize("issued_by", ["fastapi", "flask"])
@pytest.mark.parametrize("served_by", ["fastapi", "flask"])
def test_client_credentials_flow(deployment: Deployment, issued_by: str, served_by: str) -> None:
    """Get a token from one app's endpoint with a key, use it on either app: scopes stay
    within the key's, a missing scope is 403, limits are the key's, and revoking the key
    stops both new tokens and the ones issued."""
    created = deployment.manager.create(
        "partner",
        scopes=["text:generate", "keys:self"],
        limits=LimitOverrides(rate="6/minute"),
    )
    key, key_id = created.key.reveal(), created.record.id
    client = Client()
    try:
        granted = client.token(deployment.url(issued_by), key_id, key)
        assert granted.status_code == 200, granted.text
        assert granted.json()["scope"] == "keys:self text:generate"
        token = granted.json()["access_token"]
        base = deployment.url(served_by)

        who = client.call(base, "GET", "/v1/whoami", token)
        assert who.status_code == 200, who.text
        assert who.json() == {"id": key_id, "scopes": ["keys:self", "text:generate"]}
        generated = client.call(base, "POST", "/v1/generate", token)
        assert generated.json() == {"by": key_id, "method": "oauth"}

        narrow = client.token(deployment.url(issued_by), key_id, key, scope="keys:self")
        assert narrow.json()["scope"] == "keys:self"
        refused = client.call(base, "POST", "/v1/generate", narrow.json()["access_token"])
        assert refused.status_code == 403
        assert 'error="insufficient_scope"' in refused.headers["www-authenticate"]
        beyond = client.token(deployment.url(issued_by), key_id, key, scope="image:create")
        assert (beyond.status_code, beyond.json()["error"]) == (400, "invalid_scope")

        # 2 admitted so far (a 403 is refused before limits); 6/minute is shared with the key
        assert client.call(base, "GET", "/v1/whoami", key).status_code == 200
        remaining = [
            client.call(base, "GET", "/v1/whoami", credential).headers.get("x-ratelimit-remaining")
            for credential in (token, key, token)
        ]
        assert remaining == ["2", "1", "0"]
        assert client.call(base, "GET", "/v1/whoami", token).status_code == 429

        deployment.manager.revoke(key_id)
        again = client.token(deployment.url(issued_by), key_id, key)
        assert (again.status_code, again.json()["error"]) == (401, "invalid_client")
        dead = client.call(base, "GET", "/v1/whoami", token)
        assert dead.status_code == 401
        assert 'error="invalid_token"' in dead.headers["www-authenticate"]
    finally:
        client.http.close()
    for response in client.seen:  # the canary: the key's secret never comes back
        assert created.key.reveal() not in response.text
        assert created.key.reveal() not in str(response.headers)


def test_jwks_was_fetched_over_http_by_both_faces(deployment: Deployment) -> None:
    """Both guards loaded the issuer's keys from the real JWKS URL (async and sync)."""
    for name, guard in deployment.guards.items():
        assert guard.tokens is not None
        source = getattr(guard.tokens, "keys", None)
        assert isinstance(source, RemoteJWKS), name
        assert source.fetches >= 1
        assert source.keys() is not None


def test_an_unknown_bearer_is_refused_by_both(deployment: Deployment) -> None:
    """A forged token and a made-up key get 401 from both apps, never a 500."""
    client = Client()
    try:
        for app in ("fastapi", "flask"):
            base = deployment.url(app)
            for credential in ("eyJhbGciOiJub25lIn0.e30.", "kg_live_" + "A" * 38, "x" * 9000):
                assert client.call(base, "GET", "/v1/whoami", credential).status_code in {400, 401}
    finally:
        client.http.close()
