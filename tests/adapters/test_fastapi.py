"""The FastAPI adapter: route scanning, the dependency's own checks, its refusals."""

from __future__ import annotations

import asyncio
from typing import Annotated

import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI
from starlette.routing import Mount

from keyguard.adapters import fastapi as kg_fastapi
from keyguard.adapters.asgi import KeyGuardMiddleware, Message, Scope
from keyguard.adapters.fastapi import (
    FastAPIKeyGuardMiddleware,
    declared_rules,
    install_exception_handler,
    require,
)
from keyguard.errors import ConfigurationError
from keyguard.guard import Identity
from keyguard.scopes import RouteRule
from tests.adapters.clients import CLIENT_IP, MakeHarness
from tests.adapters.world import World

GENERATE = require("text:generate")
ANY_KEY = require()


def scoped_app() -> FastAPI:
    """An app whose only route needs ``text:generate``."""
    app = FastAPI()

    @app.post("/v1/generate")
    async def generate(caller: Annotated[Identity, Depends(GENERATE)]) -> dict[str, str]:
        return {"key_id": caller.key_id}

    return app


def call(
    app: object, path: str = "/v1/generate", headers: dict[str, str] | None = None
) -> httpx.Response:
    """One POST through httpx's ASGI transport."""

    async def send() -> httpx.Response:
        transport = httpx.ASGITransport(app, client=(CLIENT_IP, 1))  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            return await client.post(path, headers=headers)

    return asyncio.run(send())


def test_dependency_without_middleware_is_401_not_500() -> None:
    """Without any keyguard middleware the dependency answers 401 with a challenge."""
    response = call(scoped_app())
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith('Bearer realm="api"')
    assert response.headers["cache-control"] == "no-store"


def test_dependency_refusal_renders_like_the_middleware(make_harness: MakeHarness) -> None:
    """With the exception handler, the dependency's 401 is byte-identical to the middleware's."""
    app = scoped_app()
    install_exception_handler(app)
    from_dependency = call(app)
    from_middleware = make_harness("asgi").request("POST", "/v1/generate")
    assert from_dependency.status_code == from_middleware.status_code == 401
    assert from_dependency.content == from_middleware.content
    assert (
        from_dependency.headers["www-authenticate"] == from_middleware.headers["www-authenticate"]
    )


def test_dependency_rechecks_the_scope(make_harness: MakeHarness) -> None:
    """Behind the plain middleware (no route scan) the dependency still refuses a missing scope."""
    world = World()
    app = scoped_app()
    install_exception_handler(app)
    app.add_middleware(KeyGuardMiddleware, guard=world.guard(declared=True))
    key, _ = world.key("image:create")
    response = call(app, headers={"x-api-key": key})
    expected = make_harness("asgi")
    other, _ = expected.world.key("image:create")
    reference = expected.request("POST", "/v1/generate", {"x-api-key": other})
    assert response.status_code == 403
    assert response.content == reference.content
    world.close()


def test_unroutable_path_form_is_400(make_harness: MakeHarness) -> None:
    """A path the router and the route map could read apart is refused before any check."""
    harness = make_harness("fastapi")
    key, key_id = harness.world.key("image:create")
    before = harness.world.limits(key_id)
    response = harness.request("POST", "/v1//generate", {"x-api-key": key})
    assert response.status_code == 400
    assert harness.world.limits(key_id) == before


def test_routes_are_scanned_once(
    make_harness: MakeHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The route scan runs on the first request only."""
    scans: list[int] = []
    real = kg_fastapi.declared_rules

    def counting(*args: object, **kwargs: object) -> list[RouteRule]:
        scans.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(kg_fastapi, "declared_rules", counting)
    harness = make_harness("fastapi")
    for _ in range(3):
        harness.request("GET", "/health")
    assert scans == [1]


def test_lifespan_surfaces_a_bad_route_at_startup() -> None:
    """A scoped route the scan cannot map fails the app's startup, not each request."""
    app = FastAPI()

    @app.get("/items/{item}.json")
    async def item(caller: Annotated[Identity, Depends(GENERATE)]) -> None:
        """A parameter inside a segment."""

    world = World()
    app.add_middleware(FastAPIKeyGuardMiddleware, guard=world.guard(declared=True))
    messages: list[Message] = [{"type": "lifespan.startup"}]

    async def receive() -> Message:
        return messages.pop(0) if messages else {"type": "lifespan.shutdown"}

    async def send(message: Message) -> None:
        pass

    scope: Scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    with pytest.raises(ConfigurationError, match="inside a segment"):
        asyncio.run(app(scope, receive, send))
    world.close()


def test_declared_rules_follow_the_router() -> None:
    """Parameters keep their shape, path convertors become wildcards, mounts add their prefix."""
    app = FastAPI()
    sub = FastAPI()

    @app.get("/v1/images/{image_id}")
    async def image(caller: Annotated[Identity, Depends(require("image:read"))]) -> None:
        """One parameter."""

    @app.get("/v1/images/{other}")
    async def shadowed(caller: Annotated[Identity, Depends(require("image:other"))]) -> None:
        """Never routed: the route above matches first."""

    @app.get("/files/{path:path}")
    async def files(caller: Annotated[Identity, Depends(require("files:read"))]) -> None:
        """A path convertor."""

    @app.get("/open")
    async def open_route(caller: Annotated[Identity, Depends(ANY_KEY)]) -> None:
        """Any key: no rule."""

    @sub.post("/run", dependencies=[Depends(require("jobs:run"))])
    async def run() -> None:
        """Declared in the decorator's dependencies."""

    rules = declared_rules([*app.routes, Mount("/jobs", app=sub)])
    assert rules == [
        RouteRule("GET", "/v1/images/{p}", "image:read"),
        RouteRule("GET", "/files/*", "files:read"),
        RouteRule("POST", "/jobs/run", "jobs:run"),
    ]


def test_declared_rules_see_included_routers() -> None:
    """Routes added with include_router (lazy wrappers in FastAPI 0.16x), nested, with
    prefixes and router-level dependencies, are declared like the app's own."""
    app = FastAPI()
    v1 = APIRouter(prefix="/v1")
    admin = APIRouter(prefix="/admin", dependencies=[Depends(require("admin"))])

    @v1.post("/generate")
    async def generate(caller: Annotated[Identity, Depends(GENERATE)]) -> None:
        """Declared on the route."""

    @admin.get("/keys/{key_id}")
    async def key(key_id: str) -> None:
        """Declared on the router."""

    v1.include_router(admin)
    app.include_router(v1, prefix="/api")
    assert sorted(declared_rules(app.routes), key=lambda r: r.pattern) == [
        RouteRule("GET", "/api/v1/admin/keys/{p}", "admin"),
        RouteRule("POST", "/api/v1/generate", "text:generate"),
    ]


def test_included_router_scopes_are_enforced_before_limits() -> None:
    """A route of an included router gets its 403 from the middleware, uncharged."""
    world = World()
    app = FastAPI()
    router = APIRouter(prefix="/v2")

    @router.post("/generate")
    async def generate(caller: Annotated[Identity, Depends(GENERATE)]) -> None:
        """Needs text:generate."""

    app.include_router(router)
    app.add_middleware(FastAPIKeyGuardMiddleware, guard=world.guard(declared=True))
    key, key_id = world.key("image:create")
    before = world.limits(key_id)
    response = call(app, "/v2/generate", {"x-api-key": key})
    assert response.status_code == 403
    assert response.json()["error"]["scope"] == "text:generate"
    assert world.limits(key_id) == before
    world.close()


def test_require_refuses_a_wildcard_scope() -> None:
    """A route must name a concrete scope; wildcards are for keys."""
    with pytest.raises(ConfigurationError):
        require("image:*")


def test_mounted_app_scopes_are_enforced_before_limits() -> None:
    """A route of a mounted FastAPI app gets its 403 from the outer middleware, uncharged."""
    world = World()
    outer, sub = FastAPI(), FastAPI()

    @sub.post("/generate")
    async def generate(caller: Annotated[Identity, Depends(GENERATE)]) -> None:
        """Needs text:generate."""

    outer.mount("/v2", sub)
    outer.add_middleware(FastAPIKeyGuardMiddleware, guard=world.guard(declared=True))
    key, key_id = world.key("image:create")
    before = world.limits(key_id)
    response = call(outer, "/v2/generate", {"x-api-key": key})
    assert response.status_code == 403
    assert response.json()["error"]["scope"] == "text:generate"
    assert world.limits(key_id) == before
    world.close()
