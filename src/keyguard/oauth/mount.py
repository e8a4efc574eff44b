"""The ASGI and WSGI faces of the token endpoint: read the body (bounded), ask the core.

Both serve the endpoint's two paths, matched exactly against the path the server
gives (ASGI ``path``, WSGI ``PATH_INFO``), and hand every other request to the wrapped
app, so they mount as middleware in front of an app or stand alone::

    app.add_middleware(OAuthASGI, endpoint=endpoint)      # FastAPI / Starlette
    flask_app.wsgi_app = OAuthWSGI(endpoint, flask_app.wsgi_app)

Put them outside the guard's middleware (the token endpoint authenticates clients
itself, with the key in the form or Basic header the guard does not read).

.. versionadded:: 0.2
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ..adapters.asgi import ASGIApp, Receive, Scope, Send, request_from_scope
from ..adapters.wsgi import Environ, StartResponse, WSGIApp, request_from_environ

if TYPE_CHECKING:
    from .endpoint import Reply, TokenEndpoint

__all__ = ["OAuthASGI", "OAuthWSGI"]

_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Content Too Large",
    503: "Service Unavailable",
}


class OAuthASGI:
    """The token endpoint and JWKS route as pure ASGI middleware (or a standalone app).

    :param app: the app behind it, or ``None`` to answer 404 on every other path.
    :param endpoint: the configured :class:`~keyguard.oauth.endpoint.TokenEndpoint`.
    """

    def __init__(self, app: ASGIApp | None = None, *, endpoint: TokenEndpoint) -> None:
        self.app = app
        self.endpoint = endpoint
        self._paths = frozenset({endpoint.token_path, endpoint.jwks_path})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("path") in self._paths:
            await self._serve(scope, receive, send)
        elif self.app is not None:
            await self.app(scope, receive, send)
        elif scope["type"] == "http":
            await _asgi_send(send, self.endpoint.error("not_found", 404))
        elif scope["type"] == "lifespan":
            await _lifespan(receive, send)

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = self.endpoint
        request = request_from_scope(scope)
        body = b""
        if request.method == "POST" and request.path == endpoint.token_path:
            read = await _read_body(receive, endpoint.max_body)
            if read is None:
                await _asgi_send(send, endpoint.error("invalid_request", 413))
                return
            body = read
        await _asgi_send(send, await endpoint.ahandle(request, body))


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The request body, or ``None`` past ``limit`` bytes (the rest is not read)."""
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return bytes(body)  # the client went away; nothing left to read
        body += message.get("body", b"")
        if len(body) > limit:
            return None
        if not message.get("more_body", False):
            return bytes(body)


async def _asgi_send(send: Send, reply: Reply) -> None:
    await send({"type": "http.response.start", "status": reply.status, "headers": reply.headers})
    await send({"type": "http.response.body", "body": reply.body})


async def _lifespan(receive: Receive, send: Send) -> None:
    """A standalone endpoint has nothing to start or stop."""
    while True:
        message = await receive()
        kind = message["type"]
        if kind == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif kind == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


class OAuthWSGI:
    """The token endpoint and JWKS route as WSGI middleware (or a standalone app).

    :param endpoint: the configured :class:`~keyguard.oauth.endpoint.TokenEndpoint`.
    :param app: the app behind it, or ``None`` to answer 404 on every other path.
    """

    def __init__(self, endpoint: TokenEndpoint, app: WSGIApp | None = None) -> None:
        self.endpoint = endpoint
        self.app = app
        self._paths = frozenset({endpoint.token_path, endpoint.jwks_path})

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        endpoint = self.endpoint
        if environ.get("PATH_INFO") not in self._paths:
            if self.app is not None:
                return self.app(environ, start_response)
            return _wsgi_send(start_response, endpoint.error("not_found", 404))
        request = request_from_environ(environ)
        body = b""
        if request.method == "POST" and request.path == endpoint.token_path:
            read = _read_wsgi_body(environ, endpoint.max_body)
            if read is None:
                return _wsgi_send(start_response, endpoint.error("invalid_request", 413))
            body = read
        return _wsgi_send(start_response, endpoint.handle(request, body))


def _read_wsgi_body(environ: Environ, limit: int) -> bytes | None:
    """The body by ``CONTENT_LENGTH`` (PEP 3333 forbids reading past it), bounded."""
    stream: Any = environ.get("wsgi.input")
    length = str(environ.get("CONTENT_LENGTH") or "").strip()
    if stream is None:
        return b""
    if not length:
        # Chunked bodies arrive only where the server says the stream ends itself.
        if not environ.get("wsgi.input_terminated"):
            return b""
        body: bytes = stream.read(limit + 1)
        return None if len(body) > limit else body
    if not length.isdigit() or int(length) > limit:
        return None
    data: bytes = stream.read(int(length))
    return data


def _wsgi_send(start_response: StartResponse, reply: Reply) -> list[bytes]:
    status = f"{reply.status} {_REASONS.get(reply.status, 'Error')}"
    start_response(status, [(k.decode("latin-1"), v.decode("latin-1")) for k, v in reply.headers])
    return [reply.body]
