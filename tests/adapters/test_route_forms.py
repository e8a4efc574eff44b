"""T50 and T66 regressions: the guard checks the path and method the router serves."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from keyguard.adapters.asgi import KeyGuardMiddleware
from keyguard.adapters.wsgi import KeyGuardWSGIMiddleware
from keyguard.credentials import CredentialConfig
from keyguard.scopes import RouteMap, RouteRule
from keyguard.testing import memory_guard

ROUTES = RouteMap([RouteRule("GET", "/admin", "admin:read")])


async def _admin(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ADMIN")


def _asgi_status(root_path: str, path: str) -> int:
    """Status of a GET by a key without admin:read, through Starlette behind root_path."""
    guard, manager = memory_guard(routes=ROUTES)
    key = manager.create("no-admin").key.reveal()
    app = KeyGuardMiddleware(Starlette(routes=[Route("/admin", _admin)]), guard=guard)

    async def call() -> int:
        transport = httpx.ASGITransport(app, root_path=root_path)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return (await client.get(path, headers={"x-api-key": key})).status_code

    return asyncio.run(call())


def test_t50_root_path_cannot_move_a_route_past_its_rule() -> None:
    """Behind a root_path the rule for /admin still guards what the router serves as /admin."""
    for root_path, path in [("/api", "/api/admin"), ("", "/admin"), ("/api", "/admin")]:
        assert _asgi_status(root_path, path) == 403, (root_path, path)


def _wsgi_app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ADMIN"]


def test_t50_lower_case_method_meets_the_method_rule() -> None:
    """A WSGI server passing 'get' through cannot slip past a GET rule."""
    guard, manager = memory_guard(routes=ROUTES)
    key = manager.create("no-admin").key.reveal()
    app = KeyGuardWSGIMiddleware(_wsgi_app, guard=guard)
    seen: list[str] = []
    for method in ("GET", "get", "Get"):
        seen.clear()
        environ = {
            "REQUEST_METHOD": method,
            "PATH_INFO": "/admin",
            "HTTP_X_API_KEY": key,
            "REMOTE_ADDR": "203.0.113.7",
            "QUERY_STRING": "",
        }
        b"".join(app(environ, lambda status, headers, exc=None: seen.append(status)))
        assert seen[0].startswith("403"), method


def test_t66_request_uri_loses_the_query_key_too() -> None:
    """hide_credentials rebuilds REQUEST_URI and RAW_URI, which servers fill from the URL."""
    guard, manager = memory_guard(credentials=CredentialConfig(methods=("query",)))
    key = manager.create("k").key.reveal()
    seen: dict[str, Any] = {}

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        seen.update(environ)
        start_response("200 OK", [])
        return [b""]

    wrapped = KeyGuardWSGIMiddleware(app, guard=guard, hide_credentials=True)
    target = f"/x?a=1&api_key={key}&b=2"
    environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/x",
        "QUERY_STRING": f"a=1&api_key={key}&b=2",
        "REQUEST_URI": target,
        "RAW_URI": target,
        "REMOTE_ADDR": "203.0.113.7",
    }
    b"".join(wrapped(environ, lambda status, headers, exc=None: None))
    assert seen["REQUEST_URI"] == seen["RAW_URI"] == "/x?a=1&b=2"
    assert key not in repr(seen)
