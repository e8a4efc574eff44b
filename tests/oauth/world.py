"""A guard that accepts tokens from the stub identity provider, behind both middlewares.

One :class:`World` per test: a fake clock, a :class:`RemoteJWKS` on the stub's real
HTTP JWKS, a :class:`JWTValidator`, memory stores, and the raw ASGI and WSGI
middleware around a recording app. Requests are built byte for byte, as a server
does (``tests/adapters/security_support.py``).
"""

from __future__ import annotations

import asyncio
from typing import Any

from keyguard.adapters.asgi import KeyGuardMiddleware
from keyguard.adapters.wsgi import KeyGuardWSGIMiddleware
from keyguard.backends.memory import MemoryKeyStore
from keyguard.backends.memory_limiter import MemoryRateStore
from keyguard.denials import Denial
from keyguard.guard import Decision, Guard
from keyguard.oauth.jwks import RemoteJWKS
from keyguard.oauth.validator import JWTValidator
from keyguard.plans import Plan
from keyguard.request import RequestInfo
from keyguard.scopes import RouteMap, RouteRule
from keyguard.testing import FakeClock
from tests.adapters.security_support import (
    PEER,
    Downstream,
    Reply,
    asgi_call,
    http_scope,
    wsgi_call,
    wsgi_environ,
)
from tests.oauth.support import AUD, ISS, NOW, Keys, StubServer

ROUTES = RouteMap([RouteRule("GET", "/read", "read"), RouteRule("GET", "/write", "write")])
PLANS = {"free": Plan("free", "1000/minute")}


class World:
    """Everything one test needs; ``face`` is ``"asgi"`` or ``"wsgi"``."""

    def __init__(
        self,
        keys: Keys,
        idp: StubServer,
        attacker: StubServer,
        face: str,
        *,
        validator: dict[str, Any] | None = None,
        source: dict[str, Any] | None = None,
        guard: dict[str, Any] | None = None,
    ) -> None:
        self.keys = keys
        self.idp = idp
        self.attacker = attacker
        self.face = face
        self.clock = FakeClock(NOW)
        # A loopback fetch takes milliseconds, but on a loaded two-core machine a short
        # timeout fails it now and then; the slow-endpoint case sets its own.
        fetch: dict[str, Any] = {"timeout": 2.0, **(source or {})}
        self.source = RemoteJWKS(idp.url + "/jwks", clock=self.clock, **fetch)
        settings: dict[str, Any] = {"keys": self.source, "issuer": ISS, "audience": AUD}
        settings.update(validator or {})
        self.validator = JWTValidator(**settings)
        self.store = MemoryKeyStore()
        self.limiter = MemoryRateStore(clock=self.clock)
        options: dict[str, Any] = {
            "keys": self.store,
            "limiter": self.limiter,
            "clock": self.clock,
            "tokens": self.validator,
            "routes": ROUTES,
            "plans": PLANS,
            "auth_failures": 0,
        }
        options.update(guard or {})
        self.guard = Guard(**options)
        self.app = Downstream()
        self.asgi = KeyGuardMiddleware(self.app.asgi, guard=self.guard)
        self.wsgi = KeyGuardWSGIMiddleware(self.app.wsgi, guard=self.guard)

    @property
    def now(self) -> int:
        return int(self.clock.now())

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    def send(self, token: str, path: str = "/read") -> Reply:
        """``GET path`` with ``Authorization: Bearer token`` through this world's face."""
        headers = [(b"authorization", b"Bearer " + token.encode("latin-1"))]
        if self.face == "asgi":
            return asyncio.run(asgi_call(self.asgi, http_scope("GET", path, headers)))
        return wsgi_call(self.wsgi, wsgi_environ("GET", path, headers))

    def request(self, token: str, path: str = "/read") -> RequestInfo:
        return RequestInfo(
            "GET", path, ((b"authorization", f"Bearer {token}".encode()),), peer=PEER
        )

    def decide_many(self, tokens: list[str]) -> list[Decision]:
        """Decide on many tokens at once: concurrently on one event loop (ASGI), or
        from 16 threads (WSGI), as servers do."""
        requests = [self.request(t) for t in tokens]
        if self.face == "asgi":

            async def all_at_once() -> list[Decision]:
                return list(await asyncio.gather(*(self.guard.acheck(r) for r in requests)))

            return asyncio.run(all_at_once())
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(16) as pool:
            return list(pool.map(self.guard.check, requests))


def statuses(decisions: list[Decision]) -> set[int]:
    return {d.status if isinstance(d, Denial) else 200 for d in decisions}
