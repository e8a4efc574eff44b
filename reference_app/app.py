"""The reference server's app factory.

It mounts keyguard exactly as a user's own app would: settings from the
environment, a guard built from them, the pure ASGI middleware, and scopes declared
once in a route map. On an empty key store it creates a demo key and prints it once.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from pydantic import BaseModel, Field

from keyguard.adapters.asgi import KeyGuardMiddleware, current_identity
from keyguard.configure import build_guard
from keyguard.manager import KeyManager
from keyguard.oauth import OAuthASGI, TokenEndpoint, TokenIssuer
from keyguard.scopes import RouteRule
from keyguard.settings import KeyGuardSettings, load_settings

__all__ = ["create_app"]

RULES = (
    RouteRule("POST", "/v1/generate", "text:generate"),
    RouteRule("GET", "/v1/whoami", "keys:self"),
)
PUBLIC = ("/healthz", "/docs", "/openapi.json", "/docs/*")
DEMO_SCOPES = ("text:generate", "keys:self")
OAUTH_ISSUER = "urn:keyguard:reference"
OAUTH_AUDIENCE = "urn:keyguard:reference:api"


class GenerateRequest(BaseModel):
    prompt: str = Field(min_length=1, max_length=32_000)
    model: str = "default"
    max_tokens: int = Field(default=64, ge=1, le=4096)


def _first_run(manager: KeyManager, port: int | None) -> None:
    """Create and print a demo key once, when the store holds no key at all."""
    if manager.list(limit=1).items:
        return
    issued = manager.create("demo", scopes=DEMO_SCOPES, plan="free", actor="reference_app")
    key = issued.key.reveal()
    where = f"http://127.0.0.1:{port or 8000}"
    print(  # shown once, on purpose, to the operator at the console
        "keyguard: created a demo key (shown once; it will not be printed again):\n"
        f"  {key}\n"
        f"  curl -s -X POST {where}/v1/generate -H 'X-API-Key: {key}' "
        "-H 'Content-Type: application/json' -d '{\"prompt\": \"hello\"}'",
        file=sys.stderr,
        flush=True,
    )


def create_app(settings: KeyGuardSettings | None = None, *, port: int | None = None) -> FastAPI:
    """The server, configured by ``settings`` (default: ``load_settings()``)."""
    settings = settings or load_settings()
    # Tokens from POST /oauth/token are accepted wherever a key is. With several
    # workers, give TokenIssuer a shared signing_key, or each signs with its own.
    issuer = TokenIssuer(issuer=OAUTH_ISSUER, audience=OAUTH_AUDIENCE)
    guard = build_guard(settings, rules=RULES, public=PUBLIC, tokens=issuer.validator())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        _first_run(settings.manager(guard.backends.keys), port)
        yield
        await guard.backends.keys.aclose()
        if guard.backends.limiter is not None:
            await guard.backends.limiter.aclose()

    app = FastAPI(title="keyguard reference server", lifespan=lifespan)
    app.add_middleware(KeyGuardMiddleware, guard=guard)
    # Outermost: the token endpoint and its JWKS answer before the guard looks.
    app.add_middleware(OAuthASGI, endpoint=TokenEndpoint.from_guard(guard, issuer))

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/whoami")
    async def whoami(request: Request) -> dict[str, Any]:
        identity = current_identity(request.scope)
        if identity is None:  # pragma: no cover - the middleware refuses first
            return {}
        return {"id": identity.key_id, "name": identity.name, "scopes": list(identity.scopes)}

    @app.post("/v1/generate")
    async def generate(body: GenerateRequest) -> dict[str, Any]:
        words = body.prompt.split()[: body.max_tokens]
        text = " ".join(reversed(words))
        return {
            "model": "keyguard-offline-echo",
            "text": text,
            "usage": {"prompt_tokens": len(body.prompt.split()), "completion_tokens": len(words)},
        }

    return app
