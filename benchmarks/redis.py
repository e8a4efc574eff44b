"""Redis: keyguard's full policy on Redis next to slowapi on Redis.

The suite starts its own ``redis-server`` on a free loopback port (no persistence, a
temporary directory) and stops it at the end. Four parts:

1. **In-process cost.** The ASGI apps are called directly, as in
   :mod:`benchmarks.enforcement` (hand-built scope, one ``asyncio.run``), with the
   benchmark process and ``redis-server`` pinned to the same CPU (the issue's
   condition: every round trip is two context switches on one core). Variants: bare
   Starlette; Starlette + keyguard's full policy on ``RedisKeyStore`` +
   ``RedisRateStore`` (the key cached in the store's per-process cache after the first
   request; three windows, a monthly quota, a concurrency cap, limit headers);
   Starlette + slowapi with ``storage_uri="redis://..."`` (three windows, headers on,
   ``SlowAPIMiddleware``). For information: keyguard without the concurrency cap (no
   release), slowapi's pure-ASGI middleware, redis-py ``PING`` (sync and asyncio),
   and keyguard's store and guard calls alone.
2. **Round trips.** ``MONITOR`` on a separate connection records every command the
   server receives; commands a Lua script runs show up as ``[0 lua]`` and are counted
   apart. ``ECHO`` markers from another connection frame each variant's requests.
   ``INFO commandstats`` before and after gives the server-side commands (scripts'
   inner commands included).
3. **Under uvicorn.** Each app runs as a real ``uvicorn`` process (1 worker,
   ``--loop asyncio``, ``--no-access-log``) on loopback, driven by ``wrk`` if it is on
   the PATH, otherwise by a Python load generator in a separate process (asyncio
   protocol, keep-alive, a fixed number of connections, one request in flight per
   connection, a bounded time and count): requests/s, p50 and p99 latency, non-200s,
   and the CPU time the uvicorn process and ``redis-server`` spent per request (from
   ``/proc``). No CPU affinity is set here; the apps run in two interleaved rounds.
4. **Exactness.** Two processes x 16 threads against one key, limit 100 on three
   windows: ``limits``' Redis storage with ``FixedWindowRateLimiter`` (slowapi's
   default strategy) used test-then-hit, and used slowapi's own way (hit each window
   in order, stop at the first refusal); and keyguard's ``RedisRateStore.hit``.

``python -m benchmarks --only redis`` runs it; ``python -m benchmarks.redis load|exact``
are the worker processes' entry points.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import http.client
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from importlib import resources
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import redis as redis_py
import redis.asyncio as redis_asyncio
from starlette.applications import Starlette
from starlette.middleware import Middleware

from keyguard.adapters.asgi import request_from_scope
from keyguard.backends._redis_scripts import DELETE, FIND, SAVE
from keyguard.backends.protocols import KeyBackend
from keyguard.backends.redis import RedisKeyStore
from keyguard.backends.redis_limiter import ADMIT_SCRIPT, RedisRateStore
from keyguard.guard import Allow, Guard
from keyguard.keys import KeyFormat, KeyHasher, base62
from keyguard.lifecycle import KeySpec, create_record
from keyguard.limiting import HitRequest, LimitPolicy, Window
from keyguard.plans import DEFAULT_PLANS, Plan, resolve_policy
from keyguard.records import AuditEvent, LimitOverrides

from ._harness import AsyncLoop, Settings, SuiteReport, Timing, ameasure_many
from .enforcement import (
    _KEYGUARD_HEADERS,
    _LIMITER_HEADERS,
    PATH,
    ASGISend,
    _raw_key,
    _routes,
    asgi_loop,
    probe_asgi,
    request_headers,
    scope_base,
    starlette_app,
    starlette_keyguard,
)

__all__ = ["bare_app", "keyguard_app", "run", "slowapi_app"]

SUITE = "redis"
# High enough that no part of the run is ever refused (under uvicorn keyguard may
# serve several thousand requests a second for 11 s); the cost does not depend on it.
RATE = "1000000/minute;10000000/hour;100000000/day"
MONTHLY_QUOTA = 10**12
CONCURRENCY = 1000
MAX_OPS = 3000
KEY_PREFIX = "kgbench"  # RedisKeyStore namespace
RATE_PREFIX = "kgb"  # RedisRateStore namespace
COST_TARGET = 0.3  # keyguard / slowapi per request, at most
RPS_TARGET = 3.0  # keyguard / slowapi requests per second, at least
EXACT_LIMIT = 100
EXACT_PROCESSES = 2
EXACT_THREADS = 16
ROUND_TRIP_REQUESTS = 500
LOAD_CONNECTIONS = 32
UVICORN_ROUNDS = 2
ENV_URL = "KEYGUARD_BENCH_REDIS_URL"
ROOT = Path(__file__).resolve().parents[1]


# -- a throwaway redis-server ------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _wait_for_port(port: int, process: subprocess.Popen[bytes], deadline: float) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if process.poll() is not None:
            raise RuntimeError(f"the process on port {port} exited ({process.returncode})")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {deadline:.0f} s")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGCONT)
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@contextlib.contextmanager
def redis_server() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A fresh ``redis-server`` on a free loopback port: its URL and its process."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server not found (Debian: apt-get install redis-server)")
    with tempfile.TemporaryDirectory(prefix="keyguard-bench-redis-") as tmp:
        port = _free_port()
        args = [
            binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", tmp, "--protected-mode", "no",
        ]  # fmt: skip
        process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait_for_port(port, process, 10.0)
            yield f"redis://127.0.0.1:{port}/0", process
        finally:
            _stop(process)


def usable_cpus() -> list[int]:
    """The CPUs this process may run on (empty where affinity is not supported)."""
    getter = getattr(os, "sched_getaffinity", None)
    return sorted(getter(0)) if getter is not None else []


def pin(pid: int, cpus: set[int]) -> None:
    """Move ``pid`` (0: this thread, and what it starts later) to ``cpus``; best effort."""
    setter = getattr(os, "sched_setaffinity", None)
    if setter is not None:
        with contextlib.suppress(OSError):
            setter(pid, cpus)


@contextlib.contextmanager
def pinned(assignments: dict[int, set[int]]) -> Iterator[None]:
    """Processes (0: this thread) pinned to CPUs for the block, then back to where
    they were. Processes started inside the block inherit this thread's CPUs."""
    getter = getattr(os, "sched_getaffinity", None)
    if getter is None:
        yield
        return
    before = {pid: getter(pid) for pid in assignments}
    try:
        for pid, cpus in assignments.items():
            pin(pid, cpus)
        yield
    finally:
        for pid, cpus in before.items():
            pin(pid, cpus)


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of ``pid`` so far, from ``/proc`` (``None`` elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- keys, guards and apps ---------------------------------------------------------------


def _spec(*, cap: bool) -> KeySpec:
    limits = LimitOverrides(
        rate=RATE, quota_monthly=MONTHLY_QUOTA, concurrency=CONCURRENCY if cap else None
    )
    # The in-process client (203.0.113.7) and loopback (uvicorn) are both allowed.
    return KeySpec(
        name="bench",
        scopes=("text:generate",),
        plan="bench",
        limits=limits,
        ip_allow=("203.0.113.0/24", "127.0.0.0/8", "2001:db8::/32"),
    ).validated()


def issue_key(store: KeyBackend, index: int, *, cap: bool = True) -> str:
    """Save one key through the store's public ``save``; the raw key back."""
    fmt, hasher, now = KeyFormat(), KeyHasher(), datetime.now(UTC)
    raw = fmt.parse(_raw_key(fmt, index)).secret
    record = create_record(
        _spec(cap=cap),
        key_id="key_" + base62(index, 20),
        digest=hasher.digest(raw),
        hint=fmt.hint(raw),
        now=now,
    )
    store.save(record, AuditEvent(now, "bench", "create", record.id, {}))
    return raw.reveal()


def redis_guard(url: str, *, cache_ttl: float | None = None) -> Guard:
    """The full policy's guard on Redis, default store options (``cache_ttl`` 5 s
    unless given).

    The keys' plan, ``bench``, is a known plan with no limits of its own, so a key's
    overrides are its whole policy (an unknown plan may fall back to a default one)."""
    options = {} if cache_ttl is None else {"cache_ttl": cache_ttl}
    return Guard(
        keys=RedisKeyStore.from_url(url, prefix=KEY_PREFIX, **options),
        limiter=RedisRateStore.from_url(url, prefix=RATE_PREFIX),
        routes=_routes(),
        plans={**DEFAULT_PLANS, "bench": Plan("bench")},
    )


def slowapi_starlette(url: str, *, pure_asgi: bool = False) -> Starlette:
    """slowapi as its docs show, on Redis storage: three windows, headers on."""
    from slowapi import Limiter, _rate_limit_exceeded_handler
    from slowapi.errors import RateLimitExceeded
    from slowapi.middleware import SlowAPIASGIMiddleware, SlowAPIMiddleware
    from slowapi.util import get_remote_address

    limiter = Limiter(
        key_func=get_remote_address,
        default_limits=[RATE],
        headers_enabled=True,
        storage_uri=url,
    )
    middleware = SlowAPIASGIMiddleware if pure_asgi else SlowAPIMiddleware
    app = starlette_app([Middleware(middleware)])
    app.state.limiter = limiter
    handler: Any = _rate_limit_exceeded_handler  # typed for its own exception only
    app.add_exception_handler(RateLimitExceeded, handler)
    return app


# uvicorn factories (``--factory``): the Redis URL comes from the environment.


def bare_app() -> Starlette:
    return starlette_app()


def keyguard_app() -> Starlette:
    return starlette_keyguard(redis_guard(os.environ[ENV_URL]))


def slowapi_app() -> Starlette:
    return slowapi_starlette(os.environ[ENV_URL])


# -- 1. in-process cost ------------------------------------------------------------------

BARE = "a. Starlette, bare"
KEYGUARD = "b. Starlette + keyguard (full policy, Redis)"
SLOWAPI = "c. Starlette + slowapi (3 windows, Redis, SlowAPIMiddleware)"
KEYGUARD_NO_CAP = "i. Starlette + keyguard (3 windows + quota, no cap; Redis)"
SLOWAPI_ASGI = "i. Starlette + slowapi (3 windows, Redis, SlowAPIASGIMiddleware)"
PING_SYNC = "i. redis-py PING (sync client)"
PING_ASYNC = "i. redis-py PING (asyncio client)"
PING_STREAM = "i. PING over a bare asyncio stream (no client library)"
STORE_HIT = "i. RedisRateStore.ahit (full policy)"
STORE_HIT_RELEASE = "i. RedisRateStore.ahit + arelease (full policy)"
GUARD_CHECK = "i. Guard.acheck + arelease (full policy, key cached)"


@dataclass(slots=True)
class _InProcess:
    """The apps of part 1, kept for part 2 (the round trips)."""

    timings: dict[str, Timing]
    apps: dict[str, tuple[Any, str]]
    closers: list[Any] = field(default_factory=list)


async def _ping_loops(url: str) -> tuple[dict[str, AsyncLoop], list[Any]]:
    """PING three ways: redis-py sync, redis-py asyncio, and a bare asyncio stream (the
    floor of one round trip from this event loop, with no client library)."""
    sync = redis_py.Redis.from_url(url)
    aio = redis_asyncio.Redis.from_url(url)
    port = int(url.rsplit(":", 1)[1].split("/", 1)[0])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def ping_sync(n: int) -> None:
        for _ in range(n):
            sync.ping()

    async def ping_async(n: int) -> None:
        for _ in range(n):
            await aio.ping()

    async def ping_stream(n: int) -> None:
        for _ in range(n):
            writer.write(b"*1\r\n$4\r\nPING\r\n")
            if await reader.readline() != b"+PONG\r\n":
                raise RuntimeError("PING: unexpected reply")

    loops: dict[str, AsyncLoop] = {
        PING_SYNC: ping_sync,
        PING_ASYNC: ping_async,
        PING_STREAM: ping_stream,
    }
    return loops, [sync, aio, writer]


def _store_loops(url: str) -> tuple[AsyncLoop, AsyncLoop, RedisRateStore]:
    """The rate store's calls alone, with the policy the guard resolves for the key.

    The hit-only loop never releases, so its policy's cap is raised out of reach (the
    lease set grows by one member a hit; its operations are O(log n))."""
    store = RedisRateStore.from_url(url, prefix=RATE_PREFIX + "s")
    limits = _spec(cap=True).limits
    assert limits is not None
    policy = resolve_policy(Plan("bench"), limits, "text:generate", None)
    unreachable = replace(policy, concurrency=10**9)
    leases = itertools.count()

    async def hit(n: int) -> None:
        for _ in range(n):
            request = HitRequest("store-hit", unreachable, 1, f"l{next(leases)}")
            if not (await store.ahit(request)).allowed:
                raise RuntimeError("the rate store refused a hit")

    async def hit_release(n: int) -> None:
        for _ in range(n):
            lease = f"r{next(leases)}"
            if not (await store.ahit(HitRequest("store-hr", policy, 1, lease))).allowed:
                raise RuntimeError("the rate store refused a hit")
            await store.arelease("store-hr", lease)

    return hit, hit_release, store


def _guard_loop(guard: Guard, key: str) -> AsyncLoop:
    """The guard's decision and release alone, as the ASGI middleware calls them."""
    request = request_from_scope({**scope_base(), "headers": request_headers(key)})

    async def loop(n: int) -> None:
        for _ in range(n):
            decision = await guard.acheck(request)
            if not isinstance(decision, Allow):
                raise RuntimeError(f"the guard refused: {decision}")
            if decision.lease is not None:
                await guard.arelease(decision.lease)

    return loop


async def _check_policy(guard: Guard, key: str, names: tuple[str, ...]) -> None:
    """The guard enforces exactly the limits ``names`` for ``key`` (no more, no fewer)."""
    decision = await guard.acheck(
        request_from_scope({**scope_base(), "headers": request_headers(key)})
    )
    if not isinstance(decision, Allow) or decision.identity is None:
        raise RuntimeError(f"the guard refused the probe: {decision}")
    if decision.lease is not None:
        await guard.arelease(decision.lease)
    found = tuple(state.name for state in decision.identity.limits)
    if found != names:
        raise RuntimeError(f"the key's policy is {found}, not {names}")


async def _in_process(settings: Settings, url: str) -> _InProcess:
    guard, guard_no_cap = redis_guard(url), redis_guard(url)
    key = issue_key(guard.backends.keys, 0)
    key_no_cap = issue_key(guard.backends.keys, 1, cap=False)
    apps: dict[str, tuple[Any, str]] = {
        BARE: (starlette_app(), key),
        KEYGUARD: (starlette_keyguard(guard), key),
        SLOWAPI: (slowapi_starlette(url), key),
        KEYGUARD_NO_CAP: (starlette_keyguard(guard_no_cap), key_no_cap),
        SLOWAPI_ASGI: (slowapi_starlette(url, pure_asgi=True), key),
    }
    expected = {BARE: (), KEYGUARD: _KEYGUARD_HEADERS, KEYGUARD_NO_CAP: _KEYGUARD_HEADERS}
    for label, (app, raw) in apps.items():
        # Every variant answers 200 with its limit headers; keyguard caches the key here.
        await probe_asgi(app, raw, label, expected.get(label, _LIMITER_HEADERS))
    full, windows = ("minute", "hour", "day", "monthly", "concurrency"), ("minute", "hour", "day")
    await _check_policy(guard, key, full)
    await _check_policy(guard_no_cap, key_no_cap, (*windows, "monthly"))
    loops = {label: asgi_loop(app, [raw], ASGISend()) for label, (app, raw) in apps.items()}
    timings = await ameasure_many(loops, settings, max_ops=MAX_OPS)

    extra, clients = await _ping_loops(url)
    hit, hit_release, store = _store_loops(url)
    extra |= {STORE_HIT: hit, STORE_HIT_RELEASE: hit_release, GUARD_CHECK: _guard_loop(guard, key)}
    timings |= await ameasure_many(extra, settings, max_ops=MAX_OPS)
    clients[0].close()
    await clients[1].aclose()
    clients[2].close()
    await store.aclose()
    return _InProcess(timings, apps, [guard, guard_no_cap])


async def _close_guards(guards: Sequence[Guard]) -> None:
    for guard in guards:
        keys, limiter = guard.backends.keys, guard.backends.limiter
        if isinstance(keys, RedisKeyStore):
            await keys.aclose()
        if isinstance(limiter, RedisRateStore):
            await limiter.aclose()


# -- 2. round trips ----------------------------------------------------------------------

_MONITOR_LINE = re.compile(rb'^\+[\d.]+ \[\d+ ([^\]]+)\] "([^"]*)"(?: "([^"]*)")?')


def _sha(text: str) -> str:
    return hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()


def _script_names() -> dict[str, str]:
    names = {
        _sha(ADMIT_SCRIPT): "admit.lua",
        _sha(FIND): "key store find",
        _sha(SAVE): "key store save",
        _sha(DELETE): "key store delete",
    }
    folder = resources.files("limits").joinpath("resources", "redis", "lua_scripts")
    for entry in folder.iterdir():
        if entry.name.endswith(".lua"):
            names[_sha(entry.read_text("utf-8"))] = "limits " + entry.name
    return names


class Monitor:
    """``MONITOR`` on its own connection, read by a thread into a list of lines."""

    def __init__(self, port: int) -> None:
        self._sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self._sock.sendall(b"MONITOR\r\n")
        self._lines: list[bytes] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="bench-monitor", daemon=True)
        self._sock.settimeout(0.1)
        self._thread.start()

    def _read(self) -> None:
        pending = b""
        while not self._stop.is_set():
            try:
                data = self._sock.recv(1 << 16)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            pending += data
            *lines, pending = pending.split(b"\r\n")
            with self._lock:
                self._lines.extend(lines)

    def wait_for(self, marker: bytes, deadline: float = 5.0) -> None:
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            with self._lock:
                if any(marker in line for line in self._lines[-50:]):
                    return
            time.sleep(0.01)
        raise RuntimeError(f"MONITOR never showed {marker!r}")

    def lines(self) -> list[bytes]:
        with self._lock:
            return list(self._lines)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._sock.close()


@dataclass(frozen=True, slots=True)
class RoundTrips:
    """What one variant sent to Redis over ``requests`` requests."""

    requests: int
    sent: Counter[str]  # client-sent commands, by name (EVALSHA by script)
    in_scripts: int  # commands run inside Lua scripts
    server_commands: int  # INFO commandstats delta (scripts' commands included)
    server_usec: float  # execution time of the client-sent commands (scripts included)

    def per_request(self, name: str | None = None) -> float:
        total = sum(self.sent.values()) if name is None else self.sent[name]
        return total / self.requests


def _frame(lines: list[bytes], start: bytes, end: bytes) -> list[tuple[str, str, str]]:
    """(source, command, first argument) of the lines between the two markers."""
    inside, out = False, []
    for line in lines:
        match = _MONITOR_LINE.match(line)
        if match is None:
            continue
        source, command, arg = (g.decode(errors="replace") if g else "" for g in match.groups())
        if command.lower() == "echo" and arg.encode() in (start, end):
            if arg.encode() == end:
                break
            inside = True
            continue
        if inside:
            out.append((source, command.lower(), arg))
    return out


def _commandstats(client: redis_py.Redis) -> dict[str, tuple[int, float]]:
    """``INFO commandstats``: command -> (calls, microseconds of execution)."""
    stats: dict[str, Any] = client.info("commandstats")
    return {
        name.removeprefix("cmdstat_"): (int(value["calls"]), float(value["usec"]))
        for name, value in stats.items()
    }


def _stats_delta(
    before: dict[str, tuple[int, float]], after: dict[str, tuple[int, float]]
) -> dict[str, tuple[int, float]]:
    out = {}
    for name, (calls, usec) in after.items():
        was = before.get(name, (0, 0.0))
        if calls > was[0] and name not in {"info", "echo"}:
            out[name] = (calls - was[0], usec - was[1])
    return out


async def _round_trips(
    url: str, port: int, apps: dict[str, tuple[Any, str]], requests: int
) -> dict[str, RoundTrips]:
    """Two passes per variant: ``INFO commandstats`` alone (``MONITOR`` would slow the
    scripts, whose inner commands it reports while they run), then ``MONITOR``."""
    labels = (KEYGUARD, KEYGUARD_NO_CAP, SLOWAPI)
    control = redis_py.Redis.from_url(url)
    stats: dict[str, dict[str, tuple[int, float]]] = {}
    frames: dict[str, list[tuple[str, str, str]]] = {}
    try:
        for label in labels:
            app, raw = apps[label]
            loop = asgi_loop(app, [raw], ASGISend())
            await loop(10)  # settled: pool connections open, key cached
            before = _commandstats(control)
            await loop(requests)
            stats[label] = _stats_delta(before, _commandstats(control))
        monitor = Monitor(port)
        try:
            for label in labels:
                app, raw = apps[label]
                loop = asgi_loop(app, [raw], ASGISend())
                start, end = f"kgbench:start:{label}".encode(), f"kgbench:end:{label}".encode()
                control.echo(start)
                await loop(requests)
                control.echo(end)
                monitor.wait_for(end)
                frames[label] = _frame(monitor.lines(), start, end)
        finally:
            monitor.close()
    finally:
        control.close()
    names = _script_names()
    found = {}
    for label in labels:
        sent: Counter[str] = Counter()
        top: set[str] = set()
        in_scripts = 0
        for source, command, arg in frames[label]:
            if source == "lua":
                in_scripts += 1
                continue
            top.add(command)
            if command == "evalsha":
                sent[f"EVALSHA {names.get(arg, arg[:10])}"] += 1
            else:
                sent[command.upper()] += 1
        delta = stats[label]
        commands = sum(calls for calls, _ in delta.values())
        usec = sum(delta[name][1] for name in top if name in delta)
        found[label] = RoundTrips(requests, sent, in_scripts, commands, usec)
    return found


# -- 3. under uvicorn --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Load:
    """One load run's figures (latencies in ms; CPU in seconds, over the whole run)."""

    tool: str
    requests: int  # responses in the measured window
    seconds: float  # the measured window
    p50_ms: float
    p99_ms: float
    statuses: dict[str, int]
    errors: int
    responses: int  # responses over the whole run, warm-up included
    server_cpu: float | None = None  # CPU seconds of the uvicorn process over the run
    redis_cpu: float | None = None
    wall: float = 0.0  # seconds the whole run took

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def refused(self) -> int:
        return sum(n for status, n in self.statuses.items() if status != "200")

    def cpu_note(self) -> str:
        if self.server_cpu is None or self.redis_cpu is None or not self.responses:
            return ""
        return (
            f"uvicorn CPU {self.server_cpu / self.responses * 1e6:.0f} µs/request, "
            f"busy {self.server_cpu / self.wall:.0%}; redis-server "
            f"{self.redis_cpu / self.responses * 1e6:.0f} µs/request"
        )


class _Client(asyncio.Protocol):
    """One keep-alive connection with one request in flight at a time."""

    def __init__(self, run: _LoadRun) -> None:
        self.run = run
        self.buffer = bytearray()
        self.sent_at = 0
        self.transport: asyncio.Transport | None = None
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.send()

    def send(self) -> None:
        assert self.transport is not None
        self.sent_at = time.perf_counter_ns()
        self.transport.write(self.run.request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buffer[:end]).lower()
        at = head.find(b"\r\ncontent-length:")
        if at < 0:
            self.run.errors += 1  # chunked or no length: not expected from these apps
            self.finish()
            return
        stop = head.find(b"\r\n", at + 2)
        length = int(head[at + 17 : stop if stop >= 0 else len(head)])
        if len(self.buffer) < end + 4 + length:
            return
        status = bytes(self.buffer[9:12]).decode()
        del self.buffer[: end + 4 + length]
        self.run.record(status, time.perf_counter_ns() - self.sent_at)
        if self.run.running:
            self.send()
        else:
            self.finish()

    def finish(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            self.run.errors += 1
        if not self.closed.done():
            self.closed.set_result(None)


class _LoadRun:
    """Shared state of one load run: the phase, the counts, the latencies."""

    def __init__(self, request: bytes, max_requests: int) -> None:
        self.request = request
        self.max_requests = max_requests
        self.running = True
        self.measuring = False
        self.latencies: list[int] = []
        self.statuses: Counter[str] = Counter()
        self.errors = 0
        self.responses = 0
        self.full = asyncio.Event()

    def record(self, status: str, latency_ns: int) -> None:
        self.responses += 1
        if self.measuring:
            self.latencies.append(latency_ns)
            self.statuses[status] += 1
            if len(self.latencies) >= self.max_requests:
                self.running = False
                self.full.set()


async def _drive(
    port: int, key: str, *, connections: int, warmup: float, seconds: float, max_requests: int
) -> dict[str, Any]:
    request = (
        f"GET {PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: bench/1.0\r\n"
        f"Accept: */*\r\nX-API-Key: {key}\r\n\r\n"
    ).encode()
    run = _LoadRun(request, max_requests)
    loop = asyncio.get_running_loop()
    clients: list[_Client] = []
    for _ in range(connections):
        _, client = await loop.create_connection(lambda: _Client(run), "127.0.0.1", port)
        clients.append(client)
    await asyncio.sleep(warmup)
    run.measuring = True
    started = time.perf_counter()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(run.full.wait(), timeout=seconds)
    elapsed = time.perf_counter() - started
    run.measuring = run.running = False
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.gather(*(c.closed for c in clients)), timeout=5)
    latencies = sorted(run.latencies)
    count = len(latencies)
    return {
        "tool": f"python asyncio load generator, {connections} connections",
        "requests": count,
        "seconds": elapsed,
        "p50_ms": latencies[count // 2] / 1e6 if count else 0.0,
        "p99_ms": latencies[min(count - 1, int(count * 0.99))] / 1e6 if count else 0.0,
        "statuses": dict(run.statuses),
        "errors": run.errors,
        "responses": run.responses,
    }


def _python_load(port: int, key: str, warmup: float, seconds: float) -> Load:
    args = [
        sys.executable, "-m", "benchmarks.redis", "load", "--port", str(port), "--key", key,
        "--connections", str(LOAD_CONNECTIONS), "--warmup", str(warmup),
        "--seconds", str(seconds),
    ]  # fmt: skip
    done = subprocess.run(
        args, cwd=ROOT, capture_output=True, text=True, timeout=seconds + warmup + 60, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"the load generator failed: {done.stderr.strip()[-500:]}")
    data: dict[str, Any] = json.loads(done.stdout)
    return Load(**data)


_WRK_LATENCY = re.compile(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", re.MULTILINE)
_WRK_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _wrk_load(wrk: str, port: int, key: str, warmup: float, seconds: float) -> Load:
    base = [wrk, "-t", "2", "-c", str(LOAD_CONNECTIONS), "-H", f"X-API-Key: {key}"]
    url = f"http://127.0.0.1:{port}{PATH}"
    subprocess.run(
        [*base, "-d", f"{max(1, round(warmup))}s", url],
        capture_output=True,
        timeout=warmup + 30,
        check=True,
    )
    out = subprocess.run(
        [*base, "--latency", "-d", f"{round(seconds)}s", url],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
        check=True,
    ).stdout
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    latency = {m[0]: float(m[1]) * _WRK_UNITS[m[2]] for m in _WRK_LATENCY.findall(out)}
    refused = int(non2xx.group(1)) if non2xx else 0
    return Load(
        tool=f"wrk, 2 threads, {LOAD_CONNECTIONS} connections",
        requests=total,
        seconds=seconds,
        p50_ms=latency.get("50", 0.0),
        p99_ms=latency.get("99", 0.0),
        statuses={"200": total - refused, "other": refused} if refused else {"200": total},
        errors=0,
        responses=total,  # the warm-up run's responses are not counted by wrk
    )


def _probe_http(port: int, key: str, headers: Sequence[str]) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", PATH, headers={"X-API-Key": key})
        response = connection.getresponse()
        response.read()
        names = {name.lower() for name, _ in response.getheaders()}
    finally:
        connection.close()
    if response.status != 200 or not set(headers) <= names:
        raise RuntimeError(f"uvicorn probe: {response.status}, headers {sorted(names)}")


@contextlib.contextmanager
def uvicorn_server(factory: str, url: str) -> Iterator[tuple[int, int]]:
    """``uvicorn benchmarks.redis:<factory> --factory`` on a free loopback port: its
    port and process id."""
    port = _free_port()
    args = [
        sys.executable, "-m", "uvicorn", f"benchmarks.redis:{factory}", "--factory",
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1", "--loop", "asyncio",
        "--no-access-log", "--log-level", "warning",
    ]  # fmt: skip
    env = {**os.environ, ENV_URL: url}
    process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    try:
        _wait_for_port(port, process, 30.0)
        yield port, process.pid
    finally:
        _stop(process)


UVICORN_APPS = (
    ("bare Starlette", "bare_app", ()),
    ("Starlette + keyguard (full policy, Redis)", "keyguard_app", _KEYGUARD_HEADERS),
    ("Starlette + slowapi (3 windows, Redis)", "slowapi_app", _LIMITER_HEADERS),
)


def _load_once(
    url: str,
    redis_pid: int,
    key: str,
    app: tuple[str, str, tuple[str, ...]],
    *,
    warmup: float,
    seconds: float,
) -> Load:
    """One uvicorn process for ``app``, probed, then driven for ``seconds``."""
    _, factory, headers = app
    wrk = shutil.which("wrk")
    with uvicorn_server(factory, url) as (port, pid):
        _probe_http(port, key, headers)
        server_before, redis_before = _cpu_seconds(pid), _cpu_seconds(redis_pid)
        started = time.perf_counter()
        if wrk is not None:
            load = _wrk_load(wrk, port, key, warmup, seconds)
        else:
            load = _python_load(port, key, warmup, seconds)
        wall = time.perf_counter() - started
        server_after, redis_after = _cpu_seconds(pid), _cpu_seconds(redis_pid)
    if None in (server_before, server_after, redis_before, redis_after):
        return load
    return replace(
        load,
        server_cpu=server_after - server_before,  # type: ignore[operator]
        redis_cpu=redis_after - redis_before,  # type: ignore[operator]
        wall=wall,
    )


def _under_uvicorn(url: str, redis_pid: int, key: str, settings: Settings) -> dict[str, list[Load]]:
    """Every app ``UVICORN_ROUNDS`` times, round by round (bare, keyguard, slowapi, ...),
    so that a slow spell of the machine lands on all of them."""
    warmup, seconds = (0.5, 2.0) if settings.quick else (1.0, 10.0)
    rounds = 1 if settings.quick else UVICORN_ROUNDS
    found: dict[str, list[Load]] = {label: [] for label, _, _ in UVICORN_APPS}
    for _ in range(rounds):
        for app in UVICORN_APPS:
            found[app[0]].append(
                _load_once(url, redis_pid, key, app, warmup=warmup, seconds=seconds)
            )
    return found


def _http_implementation() -> str:
    if find_spec("httptools") is not None:
        return "httptools"
    return "h11 (httptools not installed)"


# -- 4. exactness ------------------------------------------------------------------------

EXACT_MODES = {
    "limits-test-then-hit": "limits FixedWindowRateLimiter: test all 3 windows, then hit all",
    "limits-hit-in-order": "limits FixedWindowRateLimiter: hit each window, stop at a refusal "
    "(slowapi's own loop)",
    "keyguard": "keyguard RedisRateStore.hit: one script for the 3 windows",
}
EXACT_RATE = f"{EXACT_LIMIT}/minute;{EXACT_LIMIT}/hour;{EXACT_LIMIT}/day"


def _exact_policy() -> LimitPolicy:
    return LimitPolicy(
        windows=(
            Window("minute", EXACT_LIMIT, 60),
            Window("hour", EXACT_LIMIT, 3600),
            Window("day", EXACT_LIMIT, 86_400),
        )
    )


def _charged(mode: str, url: str, key: str) -> list[int]:
    """What each of the three windows counts for ``key`` after the run."""
    if mode == "keyguard":
        store = RedisRateStore.from_url(url, prefix="kgexact")
        try:
            return [s.limit - s.remaining for s in store.peek(key, _exact_policy())]
        finally:
            store.close()
    from limits import parse_many
    from limits.storage import storage_from_string

    storage: Any = storage_from_string(url)  # a sync RedisStorage for a redis:// URL
    return [int(storage.get(item.key_for(key))) for item in parse_many(EXACT_RATE)]


def _exact_worker(mode: str, url: str, key: str, *, threads: int, attempts: int, at: float) -> None:
    """One process of the exactness run: ``threads`` threads, ``attempts`` each."""
    admit: Any
    if mode == "keyguard":
        store = RedisRateStore.from_url(
            url, prefix="kgexact", socket_timeout=5.0, max_connections=threads
        )
        policy = _exact_policy()

        def admit() -> bool:
            return store.hit(HitRequest(key, policy)).allowed

    else:
        from limits import parse_many
        from limits.storage import storage_from_string
        from limits.strategies import FixedWindowRateLimiter

        limiter = FixedWindowRateLimiter(storage_from_string(url))
        items = parse_many(EXACT_RATE)
        test_first = mode == "limits-test-then-hit"

        def admit() -> bool:
            if test_first:
                if not all(limiter.test(item, key) for item in items):
                    return False
                for item in items:
                    limiter.hit(item, key)
                return True
            return all(limiter.hit(item, key) for item in items)  # stops at the first False

    counts = {"admitted": 0, "errors": 0}
    lock = threading.Lock()
    barrier = threading.Barrier(threads)

    def work() -> None:
        barrier.wait()
        time.sleep(max(0.0, at - time.time()))
        admitted = errors = 0
        for _ in range(attempts):
            try:
                admitted += admit()
            except Exception:  # a timeout or a storage error: counted, not hidden
                errors += 1
        with lock:
            counts["admitted"] += admitted
            counts["errors"] += errors

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    print(json.dumps(counts))


@dataclass(frozen=True, slots=True)
class Exactness:
    mode: str
    attempts: int
    admitted: int
    errors: int
    charged: list[int]  # the minute, hour and day windows' counts afterwards


def _exactness(url: str, settings: Settings) -> list[Exactness]:
    attempts = 10 if settings.quick else 20
    found = []
    for mode in EXACT_MODES:
        key = f"exact-{mode}-{time.time_ns()}"
        at = time.time() + 2.5  # both processes start their threads at the same moment
        args = [
            sys.executable, "-m", "benchmarks.redis", "exact", "--mode", mode, "--url", url,
            "--key", key, "--threads", str(EXACT_THREADS), "--attempts", str(attempts),
            "--at", repr(at),
        ]  # fmt: skip
        processes = [
            subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, text=True)
            for _ in range(EXACT_PROCESSES)
        ]
        admitted = errors = 0
        for process in processes:
            out, _ = process.communicate(timeout=60)
            if process.returncode != 0:
                raise RuntimeError(f"exactness worker ({mode}) exited {process.returncode}")
            counts: dict[str, int] = json.loads(out)
            admitted += counts["admitted"]
            errors += counts["errors"]
        total = EXACT_PROCESSES * EXACT_THREADS * attempts
        found.append(Exactness(mode, total, admitted, errors, _charged(mode, url, key)))
    return found


# -- the suite ---------------------------------------------------------------------------


def _fmt(counter: Counter[str], requests: int) -> str:
    return ", ".join(f"{name} {n / requests:.2f}" for name, n in counter.most_common())


def run(settings: Settings) -> SuiteReport:
    report = SuiteReport(SUITE)
    with redis_server() as (url, process):
        port = int(url.rsplit(":", 1)[1].split("/", 1)[0])

        async def in_process() -> tuple[_InProcess, dict[str, RoundTrips]]:
            part = await _in_process(settings, url)
            try:
                trips = await _round_trips(url, port, part.apps, ROUND_TRIP_REQUESTS)
            finally:
                await _close_guards(part.closers)
            return part, trips

        cpus = usable_cpus()
        one = {cpus[0]} if cpus else set()
        with pinned({0: one, process.pid: one} if one else {}):  # the issue's "same core"
            part, trips = asyncio.run(in_process())
        where = f"benchmark and redis-server on CPU {cpus[0]}" if cpus else "unpinned"
        for label, timing in part.timings.items():
            report.add(label, timing, where if label == BARE else "")
        _derive_in_process(report, part.timings)
        _derive_round_trips(report, trips)

        store = RedisKeyStore.from_url(url, prefix=KEY_PREFIX)
        try:
            key = issue_key(store, 2)
        finally:
            store.close()
        _derive_uvicorn(report, _under_uvicorn(url, process.pid, key, settings))
        _derive_exactness(report, _exactness(url, settings))
    return report


def _derive_in_process(report: SuiteReport, t: dict[str, Timing]) -> None:
    bare = t[BARE].median
    for label in (KEYGUARD, SLOWAPI, KEYGUARD_NO_CAP, SLOWAPI_ASGI):
        report.derive(f"added: {label}", t[label].median - bare, "µs")
    kg, sa = t[KEYGUARD].median, t[SLOWAPI].median
    report.derive(
        "keyguard / slowapi, whole request (in-process)",
        kg / sa,
        "x",
        target=COST_TARGET,
        note="b / c, headers on both",
    )
    report.derive(
        "keyguard-added / slowapi-added (in-process)",
        (kg - bare) / (sa - bare),
        "x",
        target=COST_TARGET,
        note="(b - a) / (c - a)",
    )
    report.derive(
        "keyguard / slowapi pure-ASGI, whole request",
        kg / t[SLOWAPI_ASGI].median,
        "x",
        note="information",
    )
    report.derive(
        "keyguard: middleware + guard around the store calls",
        kg - bare - t[STORE_HIT_RELEASE].median,
        "µs",
        note="information: b - a - (ahit + arelease alone)",
    )
    report.derive(
        "redis-py asyncio over a bare stream, per command",
        t[PING_ASYNC].median - t[PING_STREAM].median,
        "µs",
        note="information: PING (asyncio client) - PING (bare stream)",
    )
    report.derive(
        "keyguard-added / round trips of PING (asyncio)",
        (kg - bare) / t[PING_ASYNC].median,
        "PINGs",
        note="information: keyguard's added cost in asyncio PINGs",
    )


def _derive_round_trips(report: SuiteReport, trips: dict[str, RoundTrips]) -> None:
    admit = "EVALSHA admit.lua"
    kg = trips[KEYGUARD]
    report.derive(
        "round trips / request: keyguard admission (key cached)",
        kg.per_request(admit),
        "RT",
        target=1.0,
        note="EVALSHA admit.lua: windows, quota and the concurrency slot in one script",
    )
    report.derive(
        "round trips / request: keyguard key lookups",
        kg.per_request("EVALSHA key store find"),
        "RT",
        note="the key cache's refresh, once per key per cache_ttl (5 s) per process",
    )
    report.derive(
        "round trips / request: keyguard release (after the response)",
        kg.per_request("ZREM"),
        "RT",
        note="ZREM of the concurrency lease",
    )
    report.derive(
        "round trips / request: keyguard full policy, all",
        kg.per_request(),
        "RT",
        note=_fmt(kg.sent, kg.requests),
    )
    for label, name in ((KEYGUARD_NO_CAP, "keyguard, no cap"), (SLOWAPI, "slowapi")):
        found = trips[label]
        report.derive(
            f"round trips / request: {name}",
            found.per_request(),
            "RT",
            note=_fmt(found.sent, found.requests),
        )
    for label, name in (
        (KEYGUARD, "keyguard"),
        (KEYGUARD_NO_CAP, "keyguard, no cap"),
        (SLOWAPI, "slowapi"),
    ):
        found = trips[label]
        report.derive(
            f"server commands / request: {name}",
            found.server_commands / found.requests,
            "cmd",
            note=f"INFO commandstats delta; {found.in_scripts / found.requests:.2f} inside "
            "Lua scripts (MONITOR)",
        )
        report.derive(
            f"server execution time / request: {name}",
            found.server_usec / found.requests,
            "µs",
            note="INFO commandstats usec of the commands the client sent (a script's "
            "includes its inner commands); excludes reading and writing the sockets",
        )


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _derive_uvicorn(report: SuiteReport, loads: dict[str, list[Load]]) -> None:
    labels = [label for label, _, _ in UVICORN_APPS]
    first = loads[labels[0]][0]
    rounds = len(loads[labels[0]])
    report.derive(
        "uvicorn: method",
        first.seconds,
        "s",
        note=f"{rounds} round(s) of every app; {first.tool}; HTTP {_http_implementation()}; "
        "figures are means over the rounds",
    )
    rps: dict[str, float] = {}
    for label in labels:
        runs = loads[label]
        rps[label] = _mean([r.rps for r in runs])
        each = ", ".join(f"{r.rps:.0f}" for r in runs)
        report.derive(
            f"uvicorn req/s: {label}",
            rps[label],
            "req/s",
            note=f"rounds: {each}; " + " | ".join(r.cpu_note() for r in runs),
        )
        report.derive(f"uvicorn p50: {label}", _mean([r.p50_ms for r in runs]), "ms")
        report.derive(f"uvicorn p99: {label}", _mean([r.p99_ms for r in runs]), "ms")
        cpu = [r.server_cpu / r.responses * 1e6 for r in runs if r.server_cpu and r.responses]
        if cpu:
            report.derive(
                f"uvicorn server CPU / request: {label}",
                _mean(cpu),
                "µs",
                note="CPU time of the uvicorn process over the run / its responses",
            )
        report.derive(
            f"uvicorn non-200: {label}",
            sum(r.refused + r.errors for r in runs),
            "responses",
            target=0,
            note=f"statuses {[r.statuses for r in runs]}",
        )
    bare, kg, sa = (rps[label] for label in labels)
    per_round = ", ".join(
        f"{k.rps / s.rps:.2f}" for k, s in zip(loads[labels[1]], loads[labels[2]], strict=True)
    )
    report.derive(
        "uvicorn req/s: keyguard / slowapi",
        kg / sa,
        "x",
        note=f"information (target >= {RPS_TARGET:g}x, checked below); rounds: {per_round}",
    )
    report.derive(
        "uvicorn req/s: slowapi / keyguard",
        sa / kg,
        "x",
        target=round(1 / RPS_TARGET, 3),
        note=f"keyguard >= {RPS_TARGET:g}x slowapi's req/s",
    )
    report.derive("uvicorn req/s: keyguard / bare", kg / bare, "x", note="information")


def _derive_exactness(report: SuiteReport, runs: list[Exactness]) -> None:
    for found in runs:
        is_keyguard = found.mode == "keyguard"
        report.derive(
            f"admitted of {EXACT_LIMIT}: {found.mode}",
            found.admitted,
            "requests",
            note=f"{EXACT_MODES[found.mode]}; {found.attempts} attempts by "
            f"{EXACT_PROCESSES} processes x {EXACT_THREADS} threads; errors {found.errors}; "
            f"windows afterwards (minute, hour, day): {found.charged}",
        )
        if is_keyguard:
            report.derive(
                "keyguard admitted - limit (|difference|)",
                abs(found.admitted - EXACT_LIMIT) + found.errors,
                "requests",
                target=0,
                note="exactly the limit, no errors",
            )


# -- worker entry points -----------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.redis")
    commands = parser.add_subparsers(dest="command", required=True)
    load = commands.add_parser("load", help="drive a server; print JSON figures")
    load.add_argument("--port", type=int, required=True)
    load.add_argument("--key", required=True)
    load.add_argument("--connections", type=int, default=LOAD_CONNECTIONS)
    load.add_argument("--warmup", type=float, default=1.0)
    load.add_argument("--seconds", type=float, default=10.0)
    load.add_argument("--max-requests", type=int, default=1_000_000)
    exact = commands.add_parser("exact", help="one process of the exactness run")
    exact.add_argument("--mode", choices=sorted(EXACT_MODES), required=True)
    exact.add_argument("--url", required=True)
    exact.add_argument("--key", required=True)
    exact.add_argument("--threads", type=int, default=EXACT_THREADS)
    exact.add_argument("--attempts", type=int, default=20)
    exact.add_argument("--at", type=float, required=True)
    args = parser.parse_args(argv)
    if args.command == "load":
        figures = asyncio.run(
            _drive(
                args.port,
                args.key,
                connections=args.connections,
                warmup=min(args.warmup, 10.0),
                seconds=min(args.seconds, 60.0),
                max_requests=args.max_requests,
            )
        )
        print(json.dumps(figures))
    else:
        _exact_worker(
            args.mode, args.url, args.key, threads=args.threads, attempts=args.attempts, at=args.at
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
