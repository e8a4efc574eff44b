"""The server under load: uvicorn on loopback, wrk for 10 s per configuration.

``python -m benchmarks.server_load [--seconds 10] [--connections 32] [--rounds 3] [--json]
[--only SQLite] [--loop asyncio|uvloop|auto] [--instructions]``

Configurations, each a fresh uvicorn process set up as the reference server runs
(one worker, httptools, asyncio's event loop unless ``--loop`` says, the start-up
heap frozen out of the collector's full collections) serving the same GET
route (and a streaming one): the bare route; two floors (:mod:`benchmarks._floor`:
the limit headers alone, then a sketch of a limiter that counts three windows and
sends them), what no limiter sending these headers from Python goes below; then
keyguard in front of it (``KeyGuardMiddleware`` with a route rule, a key with limits
far above what the run reaches) on the memory store, on SQLite (the embedded default:
keys, quotas and usage in the file, windows in the process), and on Redis (a
``redis-server`` started on a free port; skipped when there is none). The load
generator is ``wrk`` (Debian package ``wrk``) when installed, else a bounded asyncio
httpx generator, which is slower and measures itself as much as the server: its
figures only compare with each other.

The configurations run in ``--rounds`` interleaved rounds and each figure is the
median over them, the shares of the bare route taken within a round: this machine's
speed drifts over minutes by more than the differences measured.

The issue's target: keyguard on the embedded default keeps at least 85 % of the
bare route's requests/s, with p99 under 2x the bare p99. After the load, each
configuration's time to first chunk of a streamed response (server-sent events, as
chat completions stream) is measured over sequential requests with no other load:
the issue asks it to be unchanged, within noise, behind keyguard.

``--instructions`` counts instead of timing: each configuration's server runs under
callgrind (``valgrind``) while wrk loads it, and the event loop thread's instructions
per request are printed; steady to a percent where requests/s move 10-20 % with the
machine's other work.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import httpx
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from keyguard import KeyGuardSettings, LimitOverrides, build_guard
from keyguard.adapters.asgi import KeyGuardMiddleware
from keyguard.scopes import RouteRule

from ._floor import HeadersOnly, Sketch

ROUTE = "/v1/ping"
STREAM = "/v1/stream"
STREAM_REQUESTS = 300
SCOPE = "bench:ping"
KEY_FILE_VAR = "KEYGUARD_BENCH_KEY_FILE"
STORAGE_VAR = "KEYGUARD_STORAGE_URL"
UNLIMITED = LimitOverrides(
    rate="1000000000/minute;1000000000/hour;1000000000/day", concurrency=100_000
)


def _route(app: FastAPI) -> FastAPI:
    @app.get(ROUTE)
    async def ping() -> dict[str, bool]:
        return {"ok": True}

    @app.get(STREAM)
    async def stream() -> StreamingResponse:
        async def events() -> AsyncIterator[bytes]:
            for n in range(20):
                yield b'data: {"n": %d}\n\n' % n
                await asyncio.sleep(0.001)  # a model producing tokens
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def _frozen(app: FastAPI) -> FastAPI:
    """``app``, with everything built so far out of the collector's full collections,
    as ``python -m reference_app`` does before it serves."""
    gc.collect()
    gc.freeze()
    return app


def bare_app() -> FastAPI:
    """The route alone (``uvicorn --factory benchmarks.server_load:bare_app``)."""
    return _frozen(_route(FastAPI()))


def headers_app() -> FastAPI:
    """The route behind fixed limit headers alone (see :mod:`benchmarks._floor`)."""
    app = _route(FastAPI())
    app.add_middleware(HeadersOnly)
    return _frozen(app)


def sketch_app() -> FastAPI:
    """The route behind a sketch of a limiter (see :mod:`benchmarks._floor`)."""
    app = _route(FastAPI())
    app.add_middleware(Sketch)
    return _frozen(app)


def guarded_app() -> FastAPI:
    """The route behind keyguard, on ``KEYGUARD_STORAGE_URL``; writes a fresh key to
    the file named by ``KEYGUARD_BENCH_KEY_FILE``."""

    settings = KeyGuardSettings()
    rules = (RouteRule("GET", ROUTE, SCOPE), RouteRule("GET", STREAM, SCOPE))
    guard = build_guard(settings, rules=rules)
    manager = settings.manager(guard.backends.keys)
    issued = manager.create("bench", scopes=(SCOPE,), plan="enterprise", limits=UNLIMITED)
    Path(os.environ[KEY_FILE_VAR]).write_text(issued.key.reveal())
    app = _route(FastAPI())
    app.add_middleware(KeyGuardMiddleware, guard=guard)
    return _frozen(app)


@dataclass(frozen=True, slots=True)
class Figures:
    config: str
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    errors: int
    tool: str
    first_chunk_p50_ms: float
    first_chunk_p99_ms: float
    share_of_bare: float = 1.0  # requests/s over the bare route's of the same round
    p99_over_bare: float = 1.0  # p99 over the bare route's of the same round


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait(url: str, proc: subprocess.Popen[bytes], deadline: float = 20.0) -> None:
    end = time.monotonic() + deadline
    while True:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.TransportError:
            if time.monotonic() > end or proc.poll() is not None:
                raise RuntimeError(f"server at {url} did not start") from None
            time.sleep(0.1)


@contextmanager
def _server(
    factory: str,
    env: dict[str, str],
    wrapper: tuple[str, ...] = (),
    start: float = 20.0,
    loop: str = "asyncio",
) -> Iterator[tuple[str, int]]:
    """A uvicorn process serving ``factory`` on event loop ``loop`` (under ``wrapper``,
    e.g. valgrind): its base URL and process id."""
    port = _free_port()
    command = [
        *wrapper, sys.executable, "-m", "uvicorn", "--factory", factory,
        "--host", "127.0.0.1", "--port", str(port), "--loop", loop,
        "--no-access-log", "--log-level", "warning",
    ]  # fmt: skip
    proc = subprocess.Popen(command, env={**os.environ, **env})
    base = f"http://127.0.0.1:{port}"
    try:
        _wait(base + "/healthz", proc, start)
        yield base, proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=60)


@contextmanager
def _redis() -> Iterator[str | None]:
    binary = shutil.which("redis-server")
    if binary is None:
        yield None
        return
    port = _free_port()
    args = [binary, "--port", str(port), "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > end:
                    raise
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def _wrk(
    url: str, key: str | None, seconds: int, connections: int
) -> tuple[float, float, float, int]:
    command = ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", url]
    if key is not None:
        command[1:1] = ["-H", f"X-API-Key: {key}"]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"\s99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return rps, p50, p99, int(bad.group(1)) if bad else 0


async def _httpx_load(
    url: str, key: str | None, seconds: int, connections: int
) -> tuple[float, float, float, int]:
    """A bounded fallback: ``connections`` workers in a loop until the time is up."""
    headers = {"X-API-Key": key} if key else {}
    latencies: list[float] = []
    errors = 0
    end = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=connections)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=10) as client:

        async def worker() -> None:
            nonlocal errors
            while time.monotonic() < end:
                start = time.perf_counter()
                response = await client.get(url)
                latencies.append((time.perf_counter() - start) * 1000)
                errors += response.status_code >= 300

        await asyncio.gather(*(worker() for _ in range(connections)))
    cuts = statistics.quantiles(latencies, n=100)
    return len(latencies) / seconds, cuts[49], cuts[98], errors


def _first_chunks(url: str, key: str | None, requests: int) -> tuple[float, float]:
    """p50 and p99 (ms) from sending a request to reading its first body chunk."""
    headers = {"X-API-Key": key} if key else {}
    waits = []
    with httpx.Client(headers=headers, timeout=10) as client:
        for n in range(requests + 20):  # the first 20 warm the connection up
            start = time.perf_counter()
            with client.stream("GET", url) as response:
                chunks = response.iter_raw()
                first = next(chunks)
                waits.append((time.perf_counter() - start) * 1000)
                if response.status_code != 200 or not first.startswith(b"data:"):
                    raise RuntimeError(f"the stream answered {response.status_code}")
                for _ in chunks:
                    pass
            if n < 20:
                waits.pop()
    cuts = statistics.quantiles(waits, n=100)
    return cuts[49], cuts[98]


def _load(
    url: str, key: str | None, seconds: int, connections: int
) -> tuple[tuple[float, float, float, int], str]:
    if shutil.which("wrk"):
        return _wrk(url, key, seconds, connections), "wrk"
    return asyncio.run(_httpx_load(url, key, seconds, connections)), "httpx"


@dataclass(frozen=True, slots=True)
class Config:
    name: str
    factory: str
    storage: dict[str, str]
    keyed: bool  # the load sends the key header


def _configs(tmp: str, redis_url: str | None, only: tuple[str, ...]) -> list[Config]:
    """The bare route first, then the floors and keyguard on each store (or those
    whose name contains one of ``only``)."""
    module, sqlite = "benchmarks.server_load:", f"sqlite:///{tmp}/kg.db"
    configs = [
        Config("bare route", module + "bare_app", {}, False),
        Config("floor: headers only", module + "headers_app", {}, True),
        Config("floor: sketch", module + "sketch_app", {}, True),
        Config("keyguard, memory", module + "guarded_app", {STORAGE_VAR: "memory://"}, True),
        Config("keyguard, SQLite", module + "guarded_app", {STORAGE_VAR: sqlite}, True),
    ]
    if redis_url is not None:
        configs.append(
            Config("keyguard, Redis", module + "guarded_app", {STORAGE_VAR: redis_url}, True)
        )
    return [c for c in configs if c is configs[0] or not only or any(o in c.name for o in only)]


def _key(config: Config, key_file: Path) -> str | None:
    if not config.keyed:
        return None
    return key_file.read_text() if "guarded" in config.factory else "kg_floor_" + "x" * 37


def run(
    seconds: int,
    connections: int,
    only: tuple[str, ...] = (),
    loop: str = "asyncio",
    rounds: int = 3,
) -> list[Figures]:
    """Every configuration of :func:`_configs` on ``loop``, in ``rounds`` interleaved
    rounds: each figure is the median over the rounds, and the shares of the bare
    route are taken within a round, so that a machine whose speed drifts over
    minutes (seen here: the same route 4,000-5,600 requests/s) moves both sides."""
    measured: list[list[Figures]] = []
    with tempfile.TemporaryDirectory() as tmp, _redis() as redis_url:
        key_file = Path(tmp) / "key"
        configs = _configs(tmp, redis_url, only)
        for _ in range(rounds):
            this_round = [_measure(c, key_file, seconds, connections, loop) for c in configs]
            bare = this_round[0]
            measured.append(
                [
                    replace(
                        f,
                        share_of_bare=f.requests_per_second / bare.requests_per_second,
                        p99_over_bare=f.p99_ms / bare.p99_ms if bare.p99_ms else math.nan,
                    )
                    for f in this_round
                ]
            )
    return [_median(list(same)) for same in zip(*measured, strict=True)]


def _measure(config: Config, key_file: Path, seconds: int, connections: int, loop: str) -> Figures:
    env = {**config.storage, KEY_FILE_VAR: str(key_file)}
    with _server(config.factory, env, loop=loop) as (base, _):
        key = _key(config, key_file)
        _load(base + ROUTE, key, 1, connections)  # warm-up
        (rps, p50, p99, errors), tool = _load(base + ROUTE, key, seconds, connections)
        first50, first99 = _first_chunks(base + STREAM, key, STREAM_REQUESTS)
    return Figures(config.name, rps, p50, p99, errors, tool, first50, first99)


def _median(runs: list[Figures]) -> Figures:
    """One configuration's figures, each the median of its rounds (errors: the sum)."""

    def mid(field: str) -> float:
        return round(statistics.median(float(getattr(r, field)) for r in runs), 3)

    return Figures(
        runs[0].config, mid("requests_per_second"), mid("p50_ms"), mid("p99_ms"),
        sum(r.errors for r in runs), runs[0].tool, mid("first_chunk_p50_ms"),
        mid("first_chunk_p99_ms"), mid("share_of_bare"), mid("p99_over_bare"),
    )  # fmt: skip


def _event_loop_instructions(out: Path) -> int:
    """The instructions callgrind counted on the main thread (the event loop's) in its
    last dump, the one taken after the load."""
    dumps = sorted(out.parent.glob(out.name + ".*-01"), key=lambda p: p.stat().st_mtime)
    for line in dumps[-1].read_text(errors="replace").splitlines():
        if line.startswith("totals:"):
            return int(line.split()[1])
    raise RuntimeError(f"callgrind wrote no totals in {dumps[-1]}")


def count(seconds: int, connections: int, only: tuple[str, ...] = ()) -> list[tuple[str, float]]:
    """Instructions per request of each configuration's event-loop thread, counted by
    callgrind under ``wrk`` for ``seconds`` (valgrind runs the server ~50x slower).

    Only the event loop's thread is counted: it does every request's work, while the
    other threads (the usage flusher, SQLite's writers) work per second, not per
    request, and would count ~50x too often under valgrind's slowdown. Redis is left
    out: its timeouts are set for real time, and valgrind's pace trips them.
    """
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        key_file = Path(tmp) / "key"
        for n, config in enumerate(_configs(tmp, None, only)):
            out = Path(tmp) / f"callgrind-{n}.out"
            valgrind = (
                "valgrind", "-q", "--tool=callgrind", "--separate-threads=yes",
                f"--callgrind-out-file={out}",
            )  # fmt: skip
            env = {**config.storage, KEY_FILE_VAR: str(key_file)}
            with _server(config.factory, env, valgrind, start=300) as (base, pid):
                key = _key(config, key_file)
                _wrk(base + ROUTE, key, 3, connections)  # warm-up
                _callgrind("-z", pid)
                requests = _wrk_count(base + ROUTE, key, seconds, connections)
                _callgrind("-d", pid)
                time.sleep(1)
            results.append((config.name, _event_loop_instructions(out) / requests))
    return results


def _callgrind(command: str, pid: int) -> None:
    subprocess.run(["callgrind_control", command, str(pid)], capture_output=True, check=True)


def _wrk_count(url: str, key: str | None, seconds: int, connections: int) -> int:
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "30s", url]
    if key is not None:
        command[1:1] = ["-H", f"X-API-Key: {key}"]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    if "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"the counted load had failures:\n{out}")
    return int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.server_load")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds; figures are medians"
    )
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        help="floor, memory, SQLite or Redis (repeatable; the bare route always runs)",
    )
    parser.add_argument(
        "--loop",
        choices=("asyncio", "uvloop", "auto"),
        default="asyncio",
        help="uvicorn's event loop (asyncio: the reference server's; auto: uvloop if installed)",
    )
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="count the event loop's instructions per request under callgrind instead",
    )
    args = parser.parse_args(argv)
    if args.instructions:
        return _print_counts(args.seconds, min(args.connections, 8), tuple(args.only))
    results = run(args.seconds, args.connections, tuple(args.only), args.loop, args.rounds)
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=2))
        return 0
    bare = results[0]
    heads = ("req/s", "vs bare", "p50 ms", "p99 ms", "p99 vs bare", "errors", "1st p50", "1st p99")
    print(f"{'configuration':<20} " + " ".join(f"{h:>10}" for h in heads))
    for r in results:
        print(
            f"{r.config:<20} {r.requests_per_second:>10.0f} {r.share_of_bare:>10.0%} "
            f"{r.p50_ms:>10.2f} {r.p99_ms:>10.2f} {r.p99_over_bare:>9.2f}x {r.errors:>10} "
            f"{r.first_chunk_p50_ms:>10.2f} {r.first_chunk_p99_ms:>10.2f}"
        )
    print(
        f"load generator: {bare.tool}, {args.connections} connections, {args.seconds} s each,"
        f" medians of {args.rounds} interleaved rounds (vs bare: within a round);"
        f" uvicorn --loop {args.loop}"
    )
    print(f"1st: time to the first chunk of a streamed response, ms ({STREAM_REQUESTS} in a row)")
    return 0


def _print_counts(seconds: int, connections: int, only: tuple[str, ...]) -> int:
    missing = [t for t in ("valgrind", "callgrind_control", "wrk") if not shutil.which(t)]
    if missing:
        print(f"not found: {', '.join(missing)} (Debian: apt-get install valgrind wrk)")
        return 2
    counts = count(seconds, connections, only)
    bare = counts[0][1]
    print(f"{'configuration':<20} {'instructions':>13} {'over bare':>10} {'bare / this':>12}")
    for name, each in counts:
        print(f"{name:<20} {each:>13,.0f} {each - bare:>10,.0f} {bare / each:>12.0%}")
    print(f"per request, the event loop's thread, wrk with {connections} connections, {seconds} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
