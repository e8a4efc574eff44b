"""The same small app in five flavours: raw ASGI, Starlette, FastAPI, raw WSGI, Flask.

Every flavour serves a public ``/health``, ``POST /v1/generate`` (``text:generate``),
``GET /v1/images`` (``image:create``), a streamed ``/v1/stream`` and a ``/v1/boom``
whose handler raises. Handlers record the path they served in ``World.calls`` and
answer with what they see of the caller (:func:`describe`). Raw ASGI, Starlette and
raw WSGI take their scopes from the guard's route map; FastAPI and Flask declare them
on the routes, so their guards know only the public paths.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Annotated, Any

from fastapi import Depends, FastAPI
from fastapi.responses import StreamingResponse as FastAPIStreamingResponse
from flask import Flask
from flask import Response as FlaskResponse
from starlette.applications import Starlette
from starlette.authentication import requires
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from keyguard.adapters import wsgi
from keyguard.adapters.asgi import ASGIApp, KeyGuardMiddleware, Receive, Scope, Send
from keyguard.adapters.asgi import current_identity as asgi_identity
from keyguard.adapters.fastapi import FastAPIKeyGuardMiddleware, install_exception_handler, require
from keyguard.adapters.flask import KeyGuardFlask
from keyguard.adapters.flask import current_identity as flask_identity
from keyguard.adapters.starlette import KeyUser, StarletteKeyGuardMiddleware
from keyguard.guard import Identity
from tests.adapters.world import World

FLAVOURS = ("asgi", "starlette", "fastapi", "wsgi", "flask")
ASGI_FLAVOURS = frozenset({"asgi", "starlette", "fastapi"})
CHUNKS = (b"alpha,", b"beta,", b"gamma")
WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class Boom(RuntimeError):
    """What the failing handler raises."""


def describe(caller: Identity | None) -> dict[str, object]:
    """What a handler reports about its caller."""
    if caller is None:
        return {"key_id": None}
    return {
        "key_id": caller.key_id,
        "name": caller.name,
        "scopes": list(caller.scopes),
        "seen": repr(caller),
    }


def _json(payload: dict[str, object]) -> bytes:
    return json.dumps(payload).encode()


# -- raw ASGI ---------------------------------------------------------------------------


def raw_asgi(world: World) -> ASGIApp:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        world.calls.append(scope["path"])
        if scope["path"] == "/v1/boom":
            raise Boom("handler failed")
        if scope["path"] == "/v1/stream":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            for chunk in CHUNKS:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
            return
        body = _json(describe(asgi_identity(scope)))
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return KeyGuardMiddleware(app, guard=world.guard(declared=False))


# -- Starlette --------------------------------------------------------------------------


async def _chunks() -> AsyncIterator[bytes]:
    for chunk in CHUNKS:
        yield chunk


def starlette_app(world: World) -> Starlette:
    def seen(request: Request) -> Response:
        world.calls.append(request.url.path)
        user = request.user
        return JSONResponse(describe(user.caller if isinstance(user, KeyUser) else None))

    @requires("text:generate")
    async def generate(request: Request) -> Response:
        return seen(request)

    async def images(request: Request) -> Response:
        return seen(request)

    async def stream(request: Request) -> Response:
        world.calls.append(request.url.path)
        return StreamingResponse(_chunks())

    async def boom(request: Request) -> Response:
        world.calls.append(request.url.path)
        raise Boom("handler failed")

    routes = [
        Route("/health", images),  # a public path: request.user is UnauthenticatedUser
        Route("/v1/generate", generate, methods=["POST"]),
        Route("/v1/images", images),
        Route("/v1/stream", stream),
        Route("/v1/boom", boom),
    ]
    guard = world.guard(declared=False)
    return Starlette(
        routes=routes, middleware=[Middleware(StarletteKeyGuardMiddleware, guard=guard)]
    )


# -- FastAPI ----------------------------------------------------------------------------


def fastapi_app(world: World) -> FastAPI:
    app = FastAPI()
    app.add_middleware(FastAPIKeyGuardMiddleware, guard=world.guard(declared=True))
    install_exception_handler(app)

    @app.get("/health")
    async def health() -> dict[str, object]:
        world.calls.append("/health")
        return describe(None)

    @app.post("/v1/generate")
    async def generate(
        caller: Annotated[Identity, Depends(require("text:generate"))],
    ) -> dict[str, object]:
        world.calls.append("/v1/generate")
        return describe(caller)

    @app.get("/v1/images")
    async def images(
        caller: Annotated[Identity, Depends(require("image:create"))],
    ) -> dict[str, object]:
        world.calls.append("/v1/images")
        return describe(caller)

    @app.get("/v1/stream")
    async def stream(caller: Annotated[Identity, Depends(require())]) -> Response:
        world.calls.append("/v1/stream")
        return FastAPIStreamingResponse(_chunks())

    @app.get("/v1/boom")
    async def boom(caller: Annotated[Identity, Depends(require())]) -> None:
        world.calls.append("/v1/boom")
        raise Boom("handler failed")

    return app


# -- raw WSGI ---------------------------------------------------------------------------


def raw_wsgi(world: World) -> WSGIApp:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ["PATH_INFO"]
        world.calls.append(path)
        if path == "/v1/boom":
            raise Boom("handler failed")
        if path == "/v1/stream":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return iter(CHUNKS)
        body = _json(describe(wsgi.current_identity(environ)))
        start_response("200 OK", [("Content-Type", "application/json")])
        return [body]

    return wsgi.KeyGuardWSGIMiddleware(app, guard=world.guard(declared=False))


# -- Flask ------------------------------------------------------------------------------


def flask_app(world: World) -> Flask:
    app = Flask(__name__)
    kg = KeyGuardFlask(app, guard=world.guard(declared=True))

    def seen(path: str) -> dict[str, object]:
        world.calls.append(path)
        return describe(flask_identity())

    @app.get("/health")
    def health() -> dict[str, object]:
        return seen("/health")

    @app.post("/v1/generate")
    @kg.require("text:generate")
    def generate() -> dict[str, object]:
        return seen("/v1/generate")

    @app.get("/v1/images")
    @kg.require("image:create")
    def images() -> dict[str, object]:
        return seen("/v1/images")

    @app.get("/v1/stream")
    def stream() -> FlaskResponse:
        world.calls.append("/v1/stream")
        return FlaskResponse(_iterate(CHUNKS), mimetype="text/plain")

    @app.get("/v1/boom")
    def boom() -> FlaskResponse:
        world.calls.append("/v1/boom")
        raise Boom("handler failed")

    return app


def _iterate(chunks: Iterable[bytes]) -> Iterator[bytes]:
    yield from chunks


BUILDERS: dict[str, Callable[[World], Any]] = {
    "asgi": raw_asgi,
    "starlette": starlette_app,
    "fastapi": fastapi_app,
    "wsgi": raw_wsgi,
    "flask": flask_app,
}
