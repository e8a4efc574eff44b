"""Enforcement: what keyguard adds to each request, next to slowapi and Flask-Limiter.

Every app is called in-process, with no server and no HTTP client:

- ASGI apps get a hand-built ``scope`` and ``receive``/``send`` callables, and all
  requests of a run go through one ``asyncio.run`` (no event loop per call);
- WSGI apps get a hand-built ``environ``; the response iterable is consumed and
  closed as a server would.

Every variant builds the same per-request scope or environ (a fresh shallow copy
carrying the request's ``X-API-Key``), so that cost cancels out of the *added* cost,
which is the variant's time minus the bare app's. Before timing, one probe request
checks that the variant answers 200 and, for the limiters, sends its limit headers;
while timing, every response's status is checked and a single refusal aborts the run.

The variants (policy: ``60000/minute;1000000/hour;10000000/day``, high enough never
to refuse; the same client address throughout):

a. bare Starlette (one route returning a small JSON response);
b. Starlette + keyguard full policy: ``X-API-Key`` header, route scope via
   :class:`~keyguard.scopes.RouteMap`, per-key IP allow-list containing the client,
   the three windows, a monthly quota (huge), a concurrency cap, memory backends,
   limit headers;
c. Starlette + slowapi 0.1.10, the three windows as ``default_limits`` with
   ``SlowAPIMiddleware`` (slowapi's documented way for global limits), memory
   storage, headers enabled;
d. bare Flask; e. Flask + keyguard full policy via ``KeyGuardWSGIMiddleware``;
f. Flask + Flask-Limiter 4.1.1, the three windows as ``default_limits``, memory
   storage, headers enabled;
g. a hand-written floor: SHA-256 of the key, a dict lookup, three dict counters.

For information: keyguard enforcing the three windows only (no quota, no cap), slowapi's
pure-ASGI ``SlowAPIASGIMiddleware``, keyguard on the SQLite backends, and keyguard's
ASGI full policy with 1, 1,000 and 100,000 distinct keys (round-robin) to show it
stays flat.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flask import Flask
from starlette.applications import Starlette
from starlette.middleware import Middleware

from keyguard.adapters.asgi import KeyGuardMiddleware
from keyguard.adapters.wsgi import KeyGuardWSGIMiddleware
from keyguard.backends.memory import MemoryKeyStore
from keyguard.backends.memory_limiter import MemoryRateStore
from keyguard.backends.protocols import KeyBackend
from keyguard.backends.sqlite import SQLiteKeyStore
from keyguard.backends.sqlite_limiter import SQLiteRateStore
from keyguard.guard import Guard
from keyguard.keys import BASE62, KeyFormat, KeyHasher, base62, checksum
from keyguard.lifecycle import KeySpec, create_record
from keyguard.limiting import RateBackend
from keyguard.plans import Plan
from keyguard.records import AuditEvent, LimitOverrides
from keyguard.scopes import RouteMap, RouteRule

from ._harness import (
    AsyncLoop,
    Loop,
    Settings,
    SuiteReport,
    Timing,
    ameasure,
    ameasure_many,
    measure_many,
)

__all__ = ["run"]

SUITE = "enforcement"
PATH = "/v1/text/generate"
CLIENT_IP = "203.0.113.7"
RATE = "60000/minute;1000000/hour;10000000/day"
WINDOWS = ((60, 60_000), (3600, 1_000_000), (86_400, 10_000_000))
MONTHLY_QUOTA = 10**12
CONCURRENCY = 1000
# Requests per repeat, at most: with the warm-up (0.1 s) and 11 repeats, no variant
# sends more than about 45,000 requests on one key within a minute, so the
# 60,000/minute window never refuses however fast the code under test becomes.
MAX_OPS = 3000
SLOWAPI_TARGET = 0.25
FLASK_LIMITER_TARGET = 0.125

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Any], Callable[[Message], Any]], Any]
WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


# -- keys and guards --------------------------------------------------------------------


def _routes() -> RouteMap:
    """The reference server's shape: a few AI service routes, health and docs public."""
    return RouteMap(
        [
            RouteRule("GET", PATH, "text:generate"),
            RouteRule("POST", "/v1/images/generations", "image:create"),
            RouteRule("POST", "/v1/audio/speech", "audio:speech"),
            RouteRule("POST", "/v1/chat/completions", "chat:completions"),
        ],
        public=["/health", "/docs", "/openapi.json"],
    )


def _spec(*, full: bool) -> KeySpec:
    limits = (
        LimitOverrides(rate=RATE, quota_monthly=MONTHLY_QUOTA, concurrency=CONCURRENCY)
        if full
        else LimitOverrides(rate=RATE)
    )
    # An empty plan (see _PLANS): the key's own limits are the whole policy.
    return KeySpec(
        name="bench",
        scopes=("text:generate",),
        plan="bench",
        limits=limits,
        ip_allow=("203.0.113.0/24", "2001:db8::/32") if full else (),
    ).validated()


def _raw_key(fmt: KeyFormat, i: int) -> str:
    """A well-formed key, derived from ``i`` (setup speed; the format is keyguard's)."""
    digits = hashlib.sha256(b"bench-key-%d" % i).digest() * 2
    body = f"{fmt.prefix}_{fmt.environments[0]}_" + "".join(
        BASE62[b % 62] for b in digits[: fmt.random_length]
    )
    return body + checksum(body)


def issue_keys(store: KeyBackend, count: int, *, full: bool = True) -> list[str]:
    """``count`` keys saved through the store's public ``save``; the raw keys back."""
    fmt, hasher = KeyFormat(), KeyHasher()
    spec = _spec(full=full)
    now = datetime.now(UTC)
    raws = []
    for i in range(count):
        raw = fmt.parse(_raw_key(fmt, i)).secret
        record = create_record(
            spec,
            key_id="key_" + base62(i, 20),
            digest=hasher.digest(raw),
            hint=fmt.hint(raw),
            now=now,
        )
        store.save(record, AuditEvent(now, "bench", "create", record.id, {}))
        raws.append(raw.reveal())
    return raws


_PLANS = {"bench": Plan("bench")}  # no defaults: each variant's key says what it limits


def memory_guard(*, max_entries: int = 100_000) -> Guard:
    return Guard(
        keys=MemoryKeyStore(audit_size=16),
        limiter=MemoryRateStore(max_entries=max_entries),
        routes=_routes(),
        plans=_PLANS,
        default_plan="bench",
    )


def sqlite_guard(folder: Path) -> Guard:
    return Guard(
        keys=SQLiteKeyStore(folder / "keys.db"),
        limiter=SQLiteRateStore(folder / "limits.db"),
        routes=_routes(),
        plans=_PLANS,
        default_plan="bench",
    )


def _keys_of(guard: Guard) -> KeyBackend:
    return guard.backends.keys


def _limiter_of(guard: Guard) -> RateBackend | None:
    return guard.backends.limiter


# -- apps -------------------------------------------------------------------------------


def starlette_app(middleware: Iterable[Middleware] = ()) -> Starlette:
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def generate(request: Request) -> JSONResponse:
        return JSONResponse({"text": "ok"})

    return Starlette(routes=[Route(PATH, generate)], middleware=list(middleware))


def starlette_keyguard(guard: Guard) -> Starlette:
    return starlette_app([Middleware(KeyGuardMiddleware, guard=guard)])


def starlette_slowapi(*, pure_asgi: bool = False) -> Starlette:
    from slowapi import Limiter, _rate_limit_exceeded_handler
    from slowapi.errors import RateLimitExceeded
    from slowapi.middleware import SlowAPIASGIMiddleware, SlowAPIMiddleware
    from slowapi.util import get_remote_address

    limiter = Limiter(
        key_func=get_remote_address,
        default_limits=[RATE],
        headers_enabled=True,
        storage_uri="memory://",
    )
    middleware = SlowAPIASGIMiddleware if pure_asgi else SlowAPIMiddleware
    app = starlette_app([Middleware(middleware)])
    app.state.limiter = limiter
    # slowapi's handler is typed for its own exception, Starlette's slot for any (and
    # slowapi is only type-checked where the bench extra is installed).
    handler: Any = _rate_limit_exceeded_handler
    app.add_exception_handler(RateLimitExceeded, handler)
    return app


def flask_app() -> Flask:
    app = Flask("bench")

    @app.get(PATH)
    def generate() -> dict[str, str]:
        return {"text": "ok"}

    return app


def flask_keyguard(guard: Guard) -> Flask:
    app = flask_app()
    app.wsgi_app = KeyGuardWSGIMiddleware(app.wsgi_app, guard=guard)  # type: ignore[method-assign]
    return app


def flask_flask_limiter() -> Flask:
    from flask_limiter import Limiter
    from flask_limiter.util import get_remote_address

    app = flask_app()
    Limiter(
        get_remote_address,
        app=app,
        default_limits=[RATE],
        storage_uri="memory://",
        headers_enabled=True,
    )
    return app


# -- drivers ----------------------------------------------------------------------------


class Refused(RuntimeError):
    """A variant refused a request during a run: its figure would mean nothing."""


class ASGISend:
    """The ASGI ``send``: remembers the last response start, counts non-200s."""

    __slots__ = ("refused", "start")

    def __init__(self) -> None:
        self.refused = 0
        self.start: Message = {}

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.start = message
            if message["status"] != 200:
                self.refused += 1


_REQUEST: Message = {"type": "http.request", "body": b"", "more_body": False}


async def _receive() -> Message:
    return _REQUEST


def scope_base() -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": PATH,
        "raw_path": PATH.encode(),
        "query_string": b"",
        "root_path": "",
        "server": ("127.0.0.1", 8000),
        "client": (CLIENT_IP, 50123),
    }


def request_headers(key: str) -> list[tuple[bytes, bytes]]:
    return [
        (b"host", b"api.example.com"),
        (b"user-agent", b"bench/1.0"),
        (b"accept", b"*/*"),
        (b"x-api-key", key.encode()),
    ]


def asgi_loop(app: ASGIApp, keys: list[str], sink: ASGISend) -> AsyncLoop:
    """``n`` requests, round-robin over ``keys``, each with a fresh scope."""
    base = scope_base()
    headers = [request_headers(k) for k in keys]
    count = len(headers)

    async def loop(n: int) -> None:
        for i in range(n):
            await app({**base, "headers": headers[i % count]}, _receive, sink)
        if sink.refused:
            raise Refused(f"{sink.refused} requests were refused ({sink.start.get('status')})")

    return loop


class StartResponse:
    __slots__ = ("headers", "refused", "status")

    def __init__(self) -> None:
        self.refused = 0
        self.status = ""
        self.headers: list[tuple[str, str]] = []

    def __call__(
        self, status: str, headers: list[tuple[str, str]], exc_info: object = None
    ) -> Callable[[bytes], object]:
        self.status, self.headers = status, headers
        if not status.startswith("200"):
            self.refused += 1
        return _write


def _write(data: bytes) -> object:
    return None


def environ_base() -> dict[str, Any]:
    return {
        "REQUEST_METHOD": "GET",
        "SCRIPT_NAME": "",
        "PATH_INFO": PATH,
        "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8000",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": CLIENT_IP,
        "REMOTE_PORT": "50123",
        "HTTP_HOST": "api.example.com",
        "HTTP_USER_AGENT": "bench/1.0",
        "HTTP_ACCEPT": "*/*",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(b""),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": False,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }


def wsgi_loop(app: WSGIApp, keys: list[str], sink: StartResponse) -> Loop:
    """``n`` requests, round-robin over ``keys``; bodies consumed and closed."""
    base = environ_base()
    count = len(keys)

    def loop(n: int) -> None:
        for i in range(n):
            body = app({**base, "HTTP_X_API_KEY": keys[i % count]}, sink)
            for _chunk in body:
                pass
            close = getattr(body, "close", None)
            if close is not None:
                close()
        if sink.refused:
            raise Refused(f"{sink.refused} requests were refused ({sink.status})")

    return loop


def floor_loop(keys: list[str]) -> Loop:
    """The least any key-and-limits check can do: hash, look up, count three windows."""
    table = {hashlib.sha256(k.encode()).hexdigest(): f"key_{i}" for i, k in enumerate(keys)}
    raw = [k.encode() for k in keys]
    count = len(raw)
    counters: dict[tuple[str, int, int], int] = {}
    over = [0]

    def loop(n: int) -> None:
        sha256, clock, get = hashlib.sha256, time.time, counters.get
        for i in range(n):
            key_id = table[sha256(raw[i % count]).hexdigest()]
            now = int(clock())
            for width, limit in WINDOWS:
                slot = (key_id, width, now // width)
                hits = get(slot, 0) + 1
                if hits > limit:  # counted, not refused: the floor only does the work
                    over[0] += 1
                counters[slot] = hits

    return loop


# -- probes: one request each, before timing, to prove the variant does its job --------


def _need(found: Mapping[str, str], names: Iterable[str], variant: str) -> None:
    missing = [n for n in names if n not in found]
    if missing:
        raise RuntimeError(f"{variant}: the probe response lacks {missing}")


async def probe_asgi(app: ASGIApp, key: str, variant: str, headers: Iterable[str]) -> None:
    sink = ASGISend()
    await asgi_loop(app, [key], sink)(1)
    got = {k.decode().lower(): v.decode() for k, v in sink.start.get("headers", [])}
    _need(got, headers, variant)


def probe_wsgi(app: WSGIApp, key: str, variant: str, headers: Iterable[str]) -> None:
    sink = StartResponse()
    wsgi_loop(app, [key], sink)(1)
    _need({k.lower(): v for k, v in sink.headers}, headers, variant)


_KEYGUARD_HEADERS = ("ratelimit-policy", "ratelimit", "x-ratelimit-limit", "x-ratelimit-remaining")
_LIMITER_HEADERS = ("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset")


# -- the suite --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Variant:
    label: str
    app: Any
    key: str
    headers: tuple[str, ...] = ()


BARE_ASGI = "a. Starlette, bare"
KEYGUARD_ASGI = "b. Starlette + keyguard (full policy, memory)"
SLOWAPI = "c. Starlette + slowapi (3 windows, SlowAPIMiddleware)"
BARE_WSGI = "d. Flask, bare"
KEYGUARD_WSGI = "e. Flask + keyguard (full policy, memory)"
FLASK_LIMITER = "f. Flask + Flask-Limiter (3 windows)"
FLOOR = "g. floor: sha256 + dict lookup + 3 dict counters"
KEYGUARD_ASGI_WINDOWS = "i. Starlette + keyguard (key, scope, 3 windows; memory)"
SLOWAPI_ASGI = "i. Starlette + slowapi (3 windows, SlowAPIASGIMiddleware)"
KEYGUARD_WSGI_WINDOWS = "i. Flask + keyguard (key, scope, 3 windows; memory)"


async def _asgi_group(settings: Settings) -> dict[str, Timing]:
    full, windows = memory_guard(), memory_guard()
    full_key = issue_keys(_keys_of(full), 1)[0]
    windows_key = issue_keys(_keys_of(windows), 1, full=False)[0]
    variants = [
        _Variant(BARE_ASGI, starlette_app(), full_key),
        _Variant(KEYGUARD_ASGI, starlette_keyguard(full), full_key, _KEYGUARD_HEADERS),
        _Variant(SLOWAPI, starlette_slowapi(), full_key, _LIMITER_HEADERS),
        _Variant(
            KEYGUARD_ASGI_WINDOWS, starlette_keyguard(windows), windows_key, _KEYGUARD_HEADERS
        ),
        _Variant(SLOWAPI_ASGI, starlette_slowapi(pure_asgi=True), full_key, _LIMITER_HEADERS),
    ]
    for v in variants:
        await probe_asgi(v.app, v.key, v.label, v.headers)
    loops = {v.label: asgi_loop(v.app, [v.key], ASGISend()) for v in variants}
    return await ameasure_many(loops, settings, max_ops=MAX_OPS)


def _wsgi_group(settings: Settings) -> dict[str, Timing]:
    full, windows = memory_guard(), memory_guard()
    full_key = issue_keys(_keys_of(full), 1)[0]
    windows_key = issue_keys(_keys_of(windows), 1, full=False)[0]
    variants = [
        _Variant(BARE_WSGI, flask_app(), full_key),
        _Variant(KEYGUARD_WSGI, flask_keyguard(full), full_key, _KEYGUARD_HEADERS),
        _Variant(FLASK_LIMITER, flask_flask_limiter(), full_key, _LIMITER_HEADERS),
        _Variant(KEYGUARD_WSGI_WINDOWS, flask_keyguard(windows), windows_key, _KEYGUARD_HEADERS),
    ]
    for v in variants:
        probe_wsgi(v.app, v.key, v.label, v.headers)
    loops: dict[str, Loop] = {v.label: wsgi_loop(v.app, [v.key], StartResponse()) for v in variants}
    loops[FLOOR] = floor_loop([full_key])
    return measure_many(loops, settings, max_ops=MAX_OPS)


async def _distinct_keys(settings: Settings, counts: tuple[int, ...]) -> dict[int, Timing]:
    """The full policy over 1, 1,000 and 100,000 keys, measured interleaved."""
    loops: dict[str, AsyncLoop] = {}
    warm: dict[str, int] = {}
    limiters = []
    for count in counts:
        guard = memory_guard(max_entries=max(100_000, 2 * count))
        keys = issue_keys(_keys_of(guard), count)
        app = starlette_keyguard(guard)
        await probe_asgi(app, keys[0], f"{count} keys", _KEYGUARD_HEADERS)
        loops[str(count)] = asgi_loop(app, keys, ASGISend())
        # The warm-up visits every key once, so every key has live counters when timed.
        warm[str(count)] = count
        limiters.append(_limiter_of(guard))
    timings = await ameasure_many(loops, settings, max_ops=MAX_OPS, min_warmup=warm)
    for limiter in limiters:
        if limiter is not None:
            limiter.close()
    return {int(name): timing for name, timing in timings.items()}


async def _sqlite_asgi(settings: Settings, folder: Path) -> Timing:
    guard = sqlite_guard(folder)
    key = issue_keys(_keys_of(guard), 1)[0]
    app = starlette_keyguard(guard)
    await probe_asgi(app, key, "sqlite asgi", _KEYGUARD_HEADERS)
    return await ameasure(asgi_loop(app, [key], ASGISend()), settings, max_ops=MAX_OPS)


def _sqlite_wsgi(settings: Settings, folder: Path) -> Timing:
    guard = sqlite_guard(folder)
    key = issue_keys(_keys_of(guard), 1)[0]
    app = flask_keyguard(guard)
    probe_wsgi(app, key, "sqlite wsgi", _KEYGUARD_HEADERS)
    loop = wsgi_loop(app, [key], StartResponse())
    return measure_many({"sqlite": loop}, settings, max_ops=MAX_OPS)["sqlite"]


def run(settings: Settings) -> SuiteReport:
    report = SuiteReport(SUITE)
    asgi = asyncio.run(_asgi_group(settings))
    wsgi = _wsgi_group(settings)
    for label, timing in (*asgi.items(), *wsgi.items()):
        report.add(label, timing)

    bare_asgi, bare_wsgi = asgi[BARE_ASGI].median, wsgi[BARE_WSGI].median
    added = {label: t.median - bare_asgi for label, t in asgi.items() if label != BARE_ASGI}
    added |= {label: t.median - bare_wsgi for label, t in wsgi.items() if label != BARE_WSGI}
    added[FLOOR] = wsgi[FLOOR].median
    for label, value in added.items():
        report.derive(f"added: {label}", value, "µs")
    report.derive(
        "keyguard-added / slowapi-added (ASGI)",
        added[KEYGUARD_ASGI] / added[SLOWAPI],
        "x",
        target=SLOWAPI_TARGET,
        note="full policy vs 3 windows; SlowAPIMiddleware",
    )
    report.derive(
        "keyguard-added / Flask-Limiter-added (WSGI)",
        added[KEYGUARD_WSGI] / added[FLASK_LIMITER],
        "x",
        target=FLASK_LIMITER_TARGET,
        note="full policy vs 3 windows",
    )
    report.derive(
        "keyguard-added / slowapi-added (ASGI, pure-ASGI slowapi)",
        added[KEYGUARD_ASGI] / added[SLOWAPI_ASGI],
        "x",
        note="information: SlowAPIASGIMiddleware instead of SlowAPIMiddleware",
    )
    report.derive(
        "keyguard-added / floor (ASGI)",
        added[KEYGUARD_ASGI] / added[FLOOR],
        "x",
        note="information",
    )

    counts = (1, 1_000, 10_000) if settings.quick else (1, 1_000, 100_000)
    distinct = asyncio.run(_distinct_keys(settings, counts))
    for count, timing in distinct.items():
        report.add(
            f"Starlette + keyguard, {count:,} distinct keys",
            timing,
            "full policy, memory, round-robin over the keys",
        )
    report.derive(
        f"keyguard growth, {counts[-1]:,} vs 1 distinct keys",
        distinct[counts[-1]].median / distinct[1].median,
        "x",
        target=1.5,
        note="flat = within 1.5x",
    )

    with tempfile.TemporaryDirectory(prefix="keyguard-bench-") as tmp:
        folder = Path(tmp)
        (folder / "asgi").mkdir()
        (folder / "wsgi").mkdir()
        sqlite_asgi = asyncio.run(_sqlite_asgi(settings, folder / "asgi"))
        sqlite_wsgi = _sqlite_wsgi(settings, folder / "wsgi")
    report.add("Starlette + keyguard (full policy, SQLite)", sqlite_asgi, "information")
    report.add("Flask + keyguard (full policy, SQLite)", sqlite_wsgi, "information")
    report.derive("added: Starlette + keyguard (SQLite)", sqlite_asgi.median - bare_asgi, "µs")
    report.derive("added: Flask + keyguard (SQLite)", sqlite_wsgi.median - bare_wsgi, "µs")
    return report
