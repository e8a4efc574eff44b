"""The Starlette adapter: the caller as ``request.user`` and ``request.auth``."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from keyguard.adapters.starlette import KeyUser, StarletteKeyGuardMiddleware, identity
from tests.adapters.clients import CLIENT_IP
from tests.adapters.world import World


@pytest.fixture
def world() -> Iterator[World]:
    """A fresh clock and stores, closed after the test."""
    made = World()
    yield made
    made.close()


async def whoami(request: Request) -> Response:
    user = request.user
    caller = identity(request)
    return JSONResponse(
        {
            "type": type(user).__name__,
            "authenticated": user.is_authenticated,
            "display_name": user.display_name,
            "identity": user.identity if isinstance(user, KeyUser) else None,
            "auth": request.auth.scopes,
            "same": isinstance(user, KeyUser) and user.caller is caller,
        }
    )


def get(world: World, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
    """One GET through a Starlette app guarded by StarletteKeyGuardMiddleware."""
    middleware = [Middleware(StarletteKeyGuardMiddleware, guard=world.guard(declared=False))]
    app = Starlette(
        routes=[Route("/health", whoami), Route("/v1/images", whoami)], middleware=middleware
    )

    async def send() -> httpx.Response:
        transport = httpx.ASGITransport(app, client=(CLIENT_IP, 1))
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            return await client.get(path, headers=headers)

    return asyncio.run(send())


def test_user_and_auth_for_a_key(world: World) -> None:
    """An allowed request sees a KeyUser named after the key and the key's scopes as auth."""
    key, key_id = world.key("image:create", "text:generate")
    body = get(world, "/v1/images", {"x-api-key": key}).json()
    assert body == {
        "type": "KeyUser",
        "authenticated": True,
        "display_name": "test key",
        "identity": key_id,
        "auth": ["image:create", "text:generate"],
        "same": True,
    }


def test_public_path_has_an_unauthenticated_user(world: World) -> None:
    """A public path sees Starlette's UnauthenticatedUser and no scopes."""
    body = get(world, "/health").json()
    assert body["type"] == "UnauthenticatedUser"
    assert body["authenticated"] is False
    assert body["auth"] == []
