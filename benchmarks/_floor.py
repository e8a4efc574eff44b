"""Reference points for the server benchmark: the least a limiter in front of the
route can cost.

Neither is a limiter. ``HeadersOnly`` adds the response headers keyguard sends for the
benchmark's key (``RateLimit-Policy``, ``RateLimit``, the three ``X-RateLimit-*`` and
``Vary``), fixed bytes, and does nothing else: what the server itself spends on them.
``Sketch`` also finds the key in a dict, counts three windows and fills ``RateLimit``
per request: a limiter stripped of everything keyguard must also do (hash and check
the secret, revocation, scopes, addresses, the concurrency lease and its release,
usage, quotas, a decision a test can read). What keyguard costs above ``Sketch`` is
the price of that list; what ``Sketch`` costs above the bare route, no limiter that
sends these headers from Python avoids.
"""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["HeadersOnly", "Sketch"]

_POLICY = (
    b'"minute";q=1000000000;w=60,"hour";q=1000000000;w=3600,'
    b'"day";q=1000000000;w=86400,"concurrency";q=100000;qu="concurrent-requests"'
)
_STATE = b'"minute";r=%d;t=%d,"hour";r=%d;t=%d,"day";r=%d;t=%d,"concurrency";r=99999;t=0'
_LEGACY = (
    (b"x-ratelimit-limit", b"1000000000"),
    (b"x-ratelimit-remaining", b"999999999"),
    (b"x-ratelimit-reset", b"87620"),
    (b"vary", b"authorization, x-api-key"),
)
_FIXED = (
    (b"ratelimit-policy", _POLICY),
    (b"ratelimit", _STATE % (999999999, 60, 999999999, 3600, 999999999, 86400)),
    *_LEGACY,
)
_WINDOWS = ((60, 0), (3600, 1), (86400, 2))


def _with(send: Send, headers: tuple[tuple[bytes, bytes], ...]) -> Send:
    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), *headers]}
        await send(message)

    return sending


class HeadersOnly:
    """Fixed limit headers on every HTTP response; nothing else."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.app(scope, receive, _with(send, _FIXED))


class Sketch:
    """A dict lookup of the key header, three fixed windows counted, headers filled."""

    def __init__(self, app: ASGIApp, limit: int = 1_000_000_000) -> None:
        self.app = app
        self.limit = limit
        self.counts: dict[tuple[bytes, int, int], int] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        key = b""
        for name, value in scope["headers"]:
            if name == b"x-api-key":
                key = value
        now = time.time()
        counts = self.counts
        fields: list[int] = []
        for size, which in _WINDOWS:
            slot = (key, which, int(now // size))
            used = counts[slot] = counts.get(slot, 0) + 1
            fields += (self.limit - used, size - int(now % size))
        headers = ((b"ratelimit-policy", _POLICY), (b"ratelimit", _STATE % tuple(fields)))
        await self.app(scope, receive, _with(send, (*headers, *_LEGACY)))
