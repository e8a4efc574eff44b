"""Factories for the end-to-end SECURITY.md tests (``test_security_*.py``).

Everything here drives the raw middleware, :class:`KeyGuardMiddleware` (ASGI) and
:class:`KeyGuardWSGIMiddleware` (WSGI), around a tiny app that records what reaches it,
over the memory backends or one SQLite file, with one :class:`FakeClock` for all. It is
not a conftest: each test module declares its small fixtures and calls these factories.
"""

from __future__ import annotations

import asyncio
import io
import json
import secrets
import threading
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import httpx

from keyguard.adapters.asgi import ASGIApp, KeyGuardMiddleware, Message, Receive, Scope, Send
from keyguard.adapters.wsgi import KeyGuardWSGIMiddleware
from keyguard.backends.memory import MemoryKeyStore
from keyguard.backends.memory_limiter import MemoryRateStore
from keyguard.backends.sqlite import SQLiteKeyStore
from keyguard.backends.sqlite_limiter import SQLiteRateStore
from keyguard.denials import Denial
from keyguard.errors import StorageError
from keyguard.guard import Guard, Identity
from keyguard.keys import BASE62, checksum
from keyguard.limiting import Admission, HitRequest, LimitPolicy, LimitState, RateBackend
from keyguard.manager import KeyManager
from keyguard.plans import Plan, ServiceLimits
from keyguard.records import KeyRecord, LimitOverrides
from keyguard.request import RequestInfo
from keyguard.scopes import RouteMap, RouteRule
from keyguard.testing import FakeClock

BACKENDS = ("memory", "sqlite")
FACES = ("asgi", "wsgi")
PEER = "203.0.113.7"
PLANS: Mapping[str, Plan] = {"free": Plan("free")}  # no limit unless a key sets one

T = TypeVar("T")
WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
RawHeaders = Sequence[tuple[bytes, bytes]]


# -- credentials ------------------------------------------------------------------------


def canary() -> str:
    """32 random base62 characters: unique per call, searched for in every sink."""
    return "".join(secrets.choice(BASE62) for _ in range(32))


def well_formed(random: str, env: str = "live") -> str:
    """A key with a valid prefix and checksum around ``random``: it parses, and is unknown."""
    body = f"kg_{env}_{random}"
    return body + checksum(body)


@dataclass(frozen=True, slots=True)
class Issued:
    """A key handed out by the manager: its record and the only copy of its secret."""

    record: KeyRecord
    key: str

    @property
    def secret(self) -> str:
        """The random part of the key, the bit a leak would expose."""
        return self.key.split("_", 2)[2]


# -- responses --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    """One response as a client saw it; header names lower-case, duplicates kept."""

    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes

    def get(self, name: str) -> str | None:
        values = self.values(name)
        return values[0] if values else None

    def values(self, name: str) -> list[str]:
        key = name.lower().encode()
        return [v.decode("latin-1") for k, v in self.headers if k == key]

    def error(self) -> dict[str, Any]:
        error: dict[str, Any] = json.loads(self.body)["error"]
        return error

    def dump(self) -> str:
        """Status, every header and the body as one text, for leak searches."""
        lines = [str(self.status)] + [
            f"{k.decode('latin-1')}: {v.decode('latin-1')}" for k, v in self.headers
        ]
        return "\n".join([*lines, self.body.decode("latin-1")])


def _reply(status: int, headers: Iterable[tuple[bytes, bytes]], body: bytes) -> Reply:
    return Reply(status, tuple((k.lower(), v) for k, v in headers), body)


SERVER_ERROR = _reply(500, [(b"content-type", b"text/plain")], b"Internal Server Error")


# -- the app behind the middleware ------------------------------------------------------


class Downstream:
    """A tiny app with both faces: records the scope or environ it gets, answers 200."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.failure: Exception | None = None

    @property
    def calls(self) -> int:
        return len(self.seen)

    def identity(self) -> Identity | None:
        """The identity the middleware published for the last request that got through."""
        last = self.seen[-1]
        found = last.get("keyguard", last.get("keyguard.identity"))
        return found if isinstance(found, Identity) else None

    async def asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.seen.append(dict(scope))
        if self.failure is not None:
            raise self.failure
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/plain")],
            }
        )
        await send({"type": "http.response.body", "body": b"ok"})

    def wsgi(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        self.seen.append(dict(environ))
        if self.failure is not None:
            raise self.failure
        start_response("200 OK", [("content-type", "text/plain")])
        return [b"ok"]


# -- raw drivers: what a server does, byte for byte -------------------------------------


def http_scope(
    method: str = "GET",
    path: str = "/",
    headers: RawHeaders = (),
    query: bytes = b"",
    client: str | None = PEER,
) -> Scope:
    """An ASGI HTTP scope as a server builds it (``client`` is optional, ASGI says)."""
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query,
        "root_path": "",
        "headers": list(headers),
        "client": None if client is None else (client, 50000),
        "server": ("testserver", 80),
    }


def reply_from(messages: Sequence[Message]) -> Reply:
    """The response an ASGI app sent as ``messages``."""
    start = next(m for m in messages if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    return _reply(start["status"], start.get("headers", ()), body)


async def asgi_call(app: ASGIApp, scope: Scope) -> Reply:
    """Run one request: the body once, then ``http.disconnect`` after the response."""
    finished = asyncio.Event()
    delivered = False
    messages: list[Message] = []

    async def receive() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await finished.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        messages.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            finished.set()

    try:
        await app(scope, receive, send)
    finally:
        finished.set()
    return reply_from(messages)


def wsgi_environ(
    method: str = "GET",
    path: str = "/",
    headers: RawHeaders = (),
    query: bytes = b"",
    client: str | None = PEER,
) -> dict[str, Any]:
    """A PEP 3333 environ; repeated header lines are comma-joined, as servers do."""
    environ: dict[str, Any] = {
        "REQUEST_METHOD": method,
        "SCRIPT_NAME": "",
        "PATH_INFO": path.encode().decode("latin-1"),
        "QUERY_STRING": query.decode("latin-1"),
        "SERVER_NAME": "testserver",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(),
        "wsgi.errors": io.StringIO(),
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    if client is not None:
        environ["REMOTE_ADDR"] = client
    for name, value in headers:
        key = "HTTP_" + name.decode("latin-1").upper().replace("-", "_")
        text = value.decode("latin-1")
        environ[key] = f"{environ[key]},{text}" if key in environ else text
    return environ


def wsgi_call(app: WSGIApp, environ: dict[str, Any]) -> Reply:
    """Run one request as a server does: iterate the body, then always ``close()`` it."""
    started: list[tuple[str, list[tuple[str, str]]]] = []

    def start_response(
        status: str, headers: list[tuple[str, str]], exc_info: object = None
    ) -> None:
        started.append((status, headers))

    result = app(environ, start_response)
    try:
        body = b"".join(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    status, headers = started[-1]
    raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
    return _reply(int(status.split(" ", 1)[0]), raw, body)


# -- spies and failing doubles ----------------------------------------------------------


class _CountingFinds:
    """Counts ``find`` calls; ``failure`` makes every lookup raise it. Mixed into a store."""

    finds = 0
    failure: Exception | None = None

    def find(self, digest: str) -> KeyRecord | None:
        self.finds += 1
        if self.failure is not None:
            raise self.failure
        found: KeyRecord | None = super().find(digest)  # type: ignore[misc]
        return found


class SpyMemoryKeyStore(_CountingFinds, MemoryKeyStore):
    """The memory key store, counting lookups."""


class SpySQLiteKeyStore(_CountingFinds, SQLiteKeyStore):
    """The SQLite key store, counting lookups."""


class SpyLimiter:
    """A rate store wrapper that counts calls and can fail, or hold hits at a gate.

    With ``gate`` set, every hit runs in a worker thread that signals ``entered``,
    waits for the gate, hits the real store and signals ``done``: a hit that outlives
    the task that asked for it, as a thread-pool or network backend's does.
    """

    def __init__(self, inner: RateBackend) -> None:
        self.inner = inner
        self.hits = 0
        self.releases = 0
        self.fail_hits = False
        self.fail_releases = False
        self.gate: threading.Event | None = None
        self.entered = threading.Event()
        self.done = threading.Event()

    @property
    def threaded(self) -> bool:
        """As the wrapped store: on SQLite the guard then runs its checks in one thread hop."""
        return getattr(self.inner, "threaded", False) is True

    @property
    def queues_releases(self) -> bool:
        """As the wrapped store: on SQLite an async release only queues (never suspends)."""
        return getattr(self.inner, "queues_releases", False) is True

    def _count_hit(self) -> None:
        self.hits += 1
        if self.fail_hits:
            raise StorageError("the limit store is down")

    def _count_release(self) -> None:
        self.releases += 1
        if self.fail_releases:
            raise StorageError("the limit store is down")

    def hit(self, request: HitRequest) -> Admission:
        self._count_hit()
        if self.gate is None:
            return self.inner.hit(request)
        self.entered.set()
        self.gate.wait(10)
        try:
            return self.inner.hit(request)
        finally:
            self.done.set()

    async def ahit(self, request: HitRequest) -> Admission:
        if self.gate is not None:
            return await asyncio.to_thread(self.hit, request)
        self._count_hit()
        return await self.inner.ahit(request)

    def release(self, bucket: str, lease: str) -> None:
        self._count_release()
        self.inner.release(bucket, lease)

    async def arelease(self, bucket: str, lease: str) -> None:
        self._count_release()
        await self.inner.arelease(bucket, lease)

    def peek(self, bucket: str, policy: LimitPolicy) -> Sequence[LimitState]:
        return self.inner.peek(bucket, policy)

    async def apeek(self, bucket: str, policy: LimitPolicy) -> Sequence[LimitState]:
        return await self.inner.apeek(bucket, policy)

    def reset(self, bucket: str) -> None:
        self.inner.reset(bucket)

    async def areset(self, bucket: str) -> None:
        await self.inner.areset(bucket)

    def close(self) -> None:
        self.inner.close()

    async def aclose(self) -> None:
        await self.inner.aclose()


# -- the environment: stores, clock, app, fronts ----------------------------------------


class Front:
    """One guard behind both middlewares; requests go through the ``face`` chosen.

    :meth:`request` goes through httpx (``ASGITransport`` or ``WSGITransport``), as a
    real client would; :meth:`raw` builds the scope or environ byte for byte. An
    exception that escapes the middleware is kept in ``errors`` and answered with a
    plain 500, as a server does.
    """

    def __init__(
        self, env: Env, face: str, guard: Guard, app: Downstream, *, hide: bool, vary: bool
    ) -> None:
        self.env = env
        self.face = face
        self.guard = guard
        self.app = app
        self.asgi = KeyGuardMiddleware(app.asgi, guard=guard, hide_credentials=hide, vary=vary)
        self.wsgi = KeyGuardWSGIMiddleware(app.wsgi, guard=guard, hide_credentials=hide, vary=vary)
        self.errors: list[BaseException] = []
        self._async: dict[str, httpx.AsyncClient] = {}
        self._sync: dict[str, httpx.Client] = {}

    def request(
        self,
        method: str = "GET",
        path: str = "/",
        *,
        headers: Sequence[tuple[str, str]] = (),
        query: str = "",
        client: str = PEER,
    ) -> Reply:
        url = "http://testserver" + path + (f"?{query}" if query else "")
        try:
            if self.face == "asgi":
                response = self.env.run(
                    self._async_client(client).request(method, url, headers=list(headers))
                )
            else:
                response = self._sync_client(client).request(method, url, headers=list(headers))
        except Exception as exc:
            self.errors.append(exc)
            return SERVER_ERROR
        return _reply(response.status_code, response.headers.raw, response.content)

    def raw(
        self,
        method: str = "GET",
        path: str = "/",
        *,
        headers: RawHeaders = (),
        query: bytes = b"",
        client: str | None = PEER,
    ) -> Reply:
        try:
            if self.face == "asgi":
                scope = http_scope(method, path, headers, query, client)
                return self.env.run(asgi_call(self.asgi, scope))
            return wsgi_call(self.wsgi, wsgi_environ(method, path, headers, query, client))
        except Exception as exc:
            self.errors.append(exc)
            return SERVER_ERROR

    def key(self, key: str, path: str = "/", *, client: str = PEER) -> Reply:
        """A GET with ``X-API-Key: key``."""
        return self.request(path=path, headers=[("x-api-key", key)], client=client)

    def _async_client(self, ip: str) -> httpx.AsyncClient:
        if ip not in self._async:
            transport = httpx.ASGITransport(self.asgi, client=(ip, 50000))
            self._async[ip] = httpx.AsyncClient(transport=transport)
        return self._async[ip]

    def _sync_client(self, ip: str) -> httpx.Client:
        if ip not in self._sync:
            self._sync[ip] = httpx.Client(transport=httpx.WSGITransport(self.wsgi, remote_addr=ip))
        return self._sync[ip]

    def close(self) -> None:
        for client in self._async.values():
            self.env.run(client.aclose())
        for sync in self._sync.values():
            sync.close()


class Env:
    """Stores on one backend, one fake clock, one downstream app, and the fronts built on them.

    ``backend`` is ``"memory"`` (MemoryKeyStore, MemoryRateStore) or ``"sqlite"``
    (SQLiteKeyStore and SQLiteRateStore sharing one file under ``tmp``).
    """

    def __init__(self, backend: str, tmp: Path) -> None:
        self.backend = backend
        self.path = tmp / "keyguard.db"
        self.clock = FakeClock()
        self.keys: SpyMemoryKeyStore | SpySQLiteKeyStore
        inner: RateBackend
        if backend == "memory":
            self.keys = SpyMemoryKeyStore()
            inner = MemoryRateStore(clock=self.clock)
        else:
            self.keys = SpySQLiteKeyStore(self.path)
            inner = SQLiteRateStore(self.path, clock=self.clock)
        self.limiter = SpyLimiter(inner)
        self.manager = KeyManager(self.keys, clock=self.clock)
        self.app = Downstream()
        self._runner: asyncio.Runner | None = None
        self._fronts: list[Front] = []
        self._closers: list[Callable[[], None]] = []

    def guard(self, **options: Any) -> Guard:
        """A guard on this environment's stores and clock; ``options`` override any of it."""
        settings: dict[str, Any] = {
            "keys": self.keys,
            "limiter": self.limiter,
            "clock": self.clock,
            "plans": PLANS,
        }
        settings.update(options)
        return Guard(**settings)

    def front(
        self,
        face: str,
        guard: Guard | None = None,
        *,
        hide_credentials: bool = False,
        vary: bool = True,
        app: Downstream | None = None,
    ) -> Front:
        front = Front(
            self,
            face,
            guard or self.guard(),
            app or self.app,
            hide=hide_credentials,
            vary=vary,
        )
        self._fronts.append(front)
        return front

    def issue(
        self,
        *,
        scopes: Sequence[str] = (),
        rate: str | None = None,
        quota_daily: int | None = None,
        concurrency: int | None = None,
        ip_allow: Sequence[str] = (),
        expires: timedelta | None = None,
        manager: KeyManager | None = None,
    ) -> Issued:
        """A new key through the manager, with per-key limits when given."""
        limits = LimitOverrides(rate=rate, quota_daily=quota_daily, concurrency=concurrency)
        issued = (manager or self.manager).create(
            "test key", scopes=scopes, limits=limits, ip_allow=ip_allow, expires=expires
        )
        return Issued(issued.record, issued.key.reveal())

    def in_flight(self, key_id: str) -> int:
        """Concurrency slots the key holds right now, read from the limit store."""
        (state,) = self.limiter.inner.peek(key_id, LimitPolicy(concurrency=1000))
        return 1000 - state.remaining

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on this environment's one event loop (sync tests only)."""
        if self._runner is None:
            self._runner = asyncio.Runner()
        return self._runner.run(coro)

    def on_close(self, closer: Callable[[], None]) -> None:
        self._closers.append(closer)

    def close(self) -> None:
        for front in self._fronts:
            front.close()
        if self._runner is not None:
            self._runner.close()
        for closer in self._closers:
            closer()
        self.keys.close()
        self.limiter.close()


# -- every kind of refusal, for the sweeps (T65, T96, T98, T99) -------------------------

SWEEP_ROUTES = RouteMap(
    [RouteRule("GET", "/scoped", "orders:write"), RouteRule("GET", "/costly", "image:create")]
)
SWEEP_SERVICES = {"image:create": ServiceLimits(cost=10)}


def sweep(env: Env, face: str) -> list[tuple[str, Reply]]:
    """One response for every way through the middleware: each denial code, and a 200."""
    guard = env.guard(routes=SWEEP_ROUTES, services=SWEEP_SERVICES, auth_failures=3)
    front = env.front(face, guard)
    out: list[tuple[str, Reply]] = []

    def key(k: Issued, path: str = "/") -> Reply:
        return front.key(k.key, path)

    rated = env.issue(rate="1/minute", expires=timedelta(days=1))
    out.append(("200", key(rated)))
    out.append(("429 window", key(rated)))
    quota = env.issue(quota_daily=1)
    key(quota)
    out.append(("429 quota", key(quota)))
    out.append(
        (
            "429 cost above capacity",
            key(env.issue(scopes=["image:create"], quota_daily=5), "/costly"),
        )
    )
    held = env.issue(concurrency=1)
    taken = guard.check(RequestInfo("GET", "/", ((b"x-api-key", held.key.encode()),), peer=PEER))
    out.append(("429 concurrency", key(held)))
    if not isinstance(taken, Denial) and taken.lease is not None:
        guard.release(taken.lease)
    out.append(("401 missing", front.request()))
    out.append(("401 unknown", front.key(well_formed(canary()))))
    out.append(
        (
            "400 two methods",
            front.request(
                headers=[("x-api-key", rated.key), ("authorization", f"Bearer {rated.key}")]
            ),
        )
    )
    out.append(("403 scope", key(env.issue(), "/scoped")))
    out.append(("403 address", key(env.issue(ip_allow=["10.0.0.0/8"]))))
    stray = env.manager.create("stray", plan="retired")
    strict = env.front(face, env.guard(default_plan="retired"))
    out.append(("403 plan", strict.key(stray.key.reveal())))
    for _ in range(3):
        front.key(well_formed(canary()), client="198.51.100.99")
    out.append(("429 failed attempts", front.key(well_formed(canary()), client="198.51.100.99")))
    revealing = env.front(face, env.guard(reveal_key_status=True))
    revoked = env.issue()
    env.manager.revoke(revoked.record.id)
    out.append(("401 revoked", revealing.key(revoked.key)))
    expired = env.issue(expires=timedelta(hours=1))
    env.clock.advance(3600)
    out.append(("401 expired", revealing.key(expired.key)))
    valid = env.issue(rate="100/minute")
    env.limiter.fail_hits = True
    out.append(("503 limit store", key(valid)))
    env.limiter.fail_hits = False
    env.keys.failure = StorageError("the key store is down")
    out.append(("503 key store", key(valid)))
    env.keys.failure = RuntimeError("a bug")
    out.append(("500 internal", key(valid)))
    env.keys.failure = None
    full = MemoryRateStore(clock=env.clock, max_entries=1)
    env.on_close(full.close)
    tight = env.front(face, env.guard(limiter=full))
    tight.key(valid.key)
    out.append(("429 limiter full", tight.key(env.issue(rate="100/minute").key)))
    return out
