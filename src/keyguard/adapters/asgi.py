"""Pure ASGI middleware (no ``BaseHTTPMiddleware``), so streaming, lifespan and
context variables (OpenTelemetry's among them) pass through untouched.

The middleware builds a :class:`RequestInfo` from the scope, asks the guard, and
either answers the denial itself or calls the app with a copy of the scope carrying
the caller's :class:`Identity` under ``scope["keyguard"]``. Limit headers are added
to ``http.response.start`` only; every other message is forwarded as it comes. A
concurrency slot is released once: after the last body chunk, or when the app
raises, is cancelled or the client goes away.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from ..credentials import strip_credentials
from ..denials import Denial, render
from ..guard import Allow, Guard, Identity
from ..request import RequestInfo, request_info
from ._common import vary_headers

__all__ = ["KeyGuardMiddleware", "current_identity", "request_from_scope", "route_path"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
ErrorRenderer = Callable[[RequestInfo, Denial], tuple[int, list[tuple[bytes, bytes]], bytes]]
SCOPE_KEY = "keyguard"


def request_from_scope(scope: Scope) -> RequestInfo:
    """The framework-free view of an ASGI HTTP scope."""
    client = scope.get("client")
    route = scope.get("route")
    return request_info(
        method=scope["method"],
        path=route_path(scope),
        headers=tuple(scope.get("headers", ())),
        query_string=scope.get("query_string", b""),
        peer=client[0] if client else None,
        route_id=getattr(route, "path", None),
    )


def route_path(scope: Scope) -> str:
    """The path the app will route: ``path`` less ``root_path``, as Starlette reads it.

    Servers disagree on whether ``path`` includes ``root_path`` (uvicorn prepends it);
    routers strip it only when it is there. Checking rules against anything else
    would let a request be checked as one path and routed as another.
    """
    path: str = scope.get("path", "/")
    root: str = scope.get("root_path", "")
    if root and (path == root or path.startswith(root + "/")):
        return path[len(root) :] or "/"
    return path


def current_identity(scope: Scope) -> Identity | None:
    """The identity the middleware published for this request, if any."""
    identity = scope.get(SCOPE_KEY)
    return identity if isinstance(identity, Identity) else None


async def send_denial(
    denial: Denial,
    send: Send,
    *,
    realm: str = "api",
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """Answer a request with the denial's status, headers and JSON body."""
    status, headers, body = render(denial, realm=realm)
    if extra:
        headers.extend(extra)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _Releaser:
    """Ends one allowed request exactly once, even under cancellation: records its
    usage (when the guard records usage) and releases its lease.

    ``status`` is what the app started its response with; a response that never
    started (the app raised, or the client went away first) is recorded as 500.
    """

    __slots__ = ("_allow", "_guard", "_lease", "_request", "_started", "status")

    def __init__(self, guard: Guard, allow: Allow, request: RequestInfo, started: float) -> None:
        self._guard = guard
        self._allow: Allow | None = allow if guard.usage is not None else None
        self._lease = allow.lease
        self._request = request
        self._started = started
        self.status = 500

    async def __call__(self) -> None:
        allow, self._allow = self._allow, None
        if allow is not None:
            self._guard.finished(self._request, allow, self.status, self._started)
        lease, self._lease = self._lease, None
        if lease is None:
            return
        if self._guard.inline:  # nothing to await, so nothing a cancellation can cut short
            self._guard.release(lease)
            return
        if self._guard.quick_release:  # queued, never suspends: nothing to cut short either
            await self._guard.arelease(lease)
            return
        task = asyncio.ensure_future(self._guard.arelease(lease))
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            await task  # finish the release, then let the cancellation continue
            raise


class KeyGuardMiddleware:
    """Guard every HTTP request of an ASGI app.

    :param app: the app to protect.
    :param guard: the configured :class:`~keyguard.guard.Guard`.
    :param hide_credentials: strip the credential header or query parameter from
        the scope the app sees (it gets the identity instead).
    :param vary: add ``Vary: Authorization, X-API-Key`` so caches key on the caller.
    """

    def __init__(
        self, app: ASGIApp, *, guard: Guard, hide_credentials: bool = False, vary: bool = True
    ) -> None:
        self.app = app
        self.guard = guard
        self.hide_credentials = hide_credentials
        self._vary = vary_headers(guard, vary)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.pass_through(scope, receive, send)
            return
        started = time.perf_counter()
        request = request_from_scope(scope)
        decision = await self.guard.acheck(request)
        if isinstance(decision, Denial):
            await send_denial(decision, send, realm=self.guard.realm, extra=self._vary)
            return
        await self._call_app(scope, receive, send, request, decision, started=started)

    async def pass_through(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Hand a non-HTTP scope to the app; on lifespan shutdown, write pending usage.

        The usage recorder is flushed before the server hears the app has shut down
        (``lifespan.shutdown.complete``), so a graceful stop loses no counts.
        """
        usage = self.guard.usage
        if scope["type"] != "lifespan" or usage is None:
            await self.app(scope, receive, send)
            return

        async def send_after_flush(message: Message) -> None:
            if message["type"] == "lifespan.shutdown.complete":
                await asyncio.to_thread(usage.close)
            await send(message)

        await self.app(scope, receive, send_after_flush)

    async def _call_app(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        request: RequestInfo,
        allow: Allow,
        *,
        started: float,
    ) -> None:
        child = dict(scope)
        child[SCOPE_KEY] = allow.identity
        if self.hide_credentials and allow.identity is not None:
            headers, query = strip_credentials(request, self.guard.credentials)
            child["headers"] = list(headers)
            child["query_string"] = query
        identity = allow.identity
        extra = [*allow.headers, *self._vary] if identity is not None else []
        # A key from the URL makes the response private (RFC 6750 §2.3) even when no
        # other header is added (vary=False, no limits): checked on its own.
        private = identity is not None and identity.auth_method == "query"
        recorded = identity is not None and self.guard.usage is not None
        if not extra and not private and allow.lease is None and not recorded:
            await self.app(child, receive, send)
            return
        release = _Releaser(self.guard, allow, request, started)

        async def send_with_headers(message: Message) -> None:
            kind = message["type"]
            if kind == "http.response.start":
                release.status = message.get("status", 200)
            if kind == "http.response.start" and (extra or private):
                headers = [*message.get("headers", ()), *extra]
                if private and not any(k.lower() == b"cache-control" for k, _ in headers):
                    headers.append((b"cache-control", b"private"))  # RFC 6750 §2.3
                message = {**message, "headers": headers}
            await send(message)
            if (kind == "http.response.body" and not message.get("more_body", False)) or (
                kind == "http.response.pathsend"
            ):
                await release()

        try:
            await self.app(child, receive, send_with_headers)
        finally:
            await release()
