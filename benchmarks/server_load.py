"""The server under load: uvicorn on loopback, wrk for 10 s per configuration.

``python -m benchmarks.server_load [--seconds 10] [--connections 32] [--json] [--only SQLite]``

Configurations, each a fresh uvicorn process (one worker) serving the same GET
route (and a streaming one): the bare route, then keyguard in front of it
(``KeyGuardMiddleware`` with a route rule, a key with limits far above what the run
reaches) on the memory store, on SQLite (the embedded default: keys, quotas and usage
in the file, windows in the process), and on Redis (a ``redis-server`` started on a
free port; skipped when there is none). The load generator is ``wrk`` (Debian
package ``wrk``) when installed, else a bounded asyncio httpx generator, which is
slower and measures itself as much as the server: its figures only compare with
each other.

The issue's target: keyguard on the embedded default keeps at least 85 % of the
bare route's requests/s, with p99 under 2x the bare p99. After the load, each
configuration's time to first chunk of a streamed response (server-sent events, as
chat completions stream) is measured over sequential requests with no other load:
the issue asks it to be unchanged, within noise, behind keyguard.
"""

from __future__ import annotations

import argparse
import asyncio
import json
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
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from keyguard import KeyGuardSettings, LimitOverrides, build_guard
from keyguard.adapters.asgi import KeyGuardMiddleware
from keyguard.scopes import RouteRule

ROUTE = "/v1/ping"
STREAM = "/v1/stream"
STREAM_REQUESTS = 300
SCOPE = "bench:ping"
KEY_FILE_VAR = "KEYGUARD_BENCH_KEY_FILE"
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


def bare_app() -> FastAPI:
    """The route alone (``uvicorn --factory benchmarks.server_load:bare_app``)."""
    return _route(FastAPI())


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
    return app


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
def _server(factory: str, env: dict[str, str]) -> Iterator[str]:
    port = _free_port()
    command = [
        sys.executable, "-m", "uvicorn", "--factory", factory,
        "--host", "127.0.0.1", "--port", str(port),
        "--no-access-log", "--log-level", "warning",
    ]  # fmt: skip
    proc = subprocess.Popen(command, env={**os.environ, **env})
    base = f"http://127.0.0.1:{port}"
    try:
        _wait(base + "/healthz", proc)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=10)


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


def run(seconds: int, connections: int, only: tuple[str, ...] = ()) -> list[Figures]:
    """Every configuration (or those whose name contains one of ``only``, and the
    bare route), one after the other."""
    results = []
    with tempfile.TemporaryDirectory() as tmp, _redis() as redis_url:
        key_file = Path(tmp) / "key"
        configs: list[tuple[str, str, dict[str, str]]] = [
            ("bare route", "benchmarks.server_load:bare_app", {}),
            (
                "keyguard, memory",
                "benchmarks.server_load:guarded_app",
                {"KEYGUARD_STORAGE_URL": "memory://"},
            ),
            (
                "keyguard, SQLite",
                "benchmarks.server_load:guarded_app",
                {"KEYGUARD_STORAGE_URL": f"sqlite:///{tmp}/kg.db"},
            ),
        ]
        if redis_url is not None:
            configs.append(
                (
                    "keyguard, Redis",
                    "benchmarks.server_load:guarded_app",
                    {"KEYGUARD_STORAGE_URL": redis_url},
                )
            )
        for name, factory, storage in configs:
            if only and name != "bare route" and not any(o in name for o in only):
                continue
            with _server(factory, {**storage, KEY_FILE_VAR: str(key_file)}) as base:
                key = key_file.read_text() if "guarded" in factory else None
                _load(base + ROUTE, key, 1, connections)  # warm-up
                (rps, p50, p99, errors), tool = _load(base + ROUTE, key, seconds, connections)
                first50, first99 = _first_chunks(base + STREAM, key, STREAM_REQUESTS)
            results.append(
                Figures(
                    name, round(rps, 1), round(p50, 3), round(p99, 3), errors, tool,
                    round(first50, 3), round(first99, 3),
                )
            )  # fmt: skip
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.server_load")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--only", action="append", default=[], help="memory, SQLite or Redis (repeatable)"
    )
    args = parser.parse_args(argv)
    results = run(args.seconds, args.connections, tuple(args.only))
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=2))
        return 0
    bare = results[0]
    heads = ("req/s", "vs bare", "p50 ms", "p99 ms", "p99 vs bare", "errors", "1st p50", "1st p99")
    print(f"{'configuration':<20} " + " ".join(f"{h:>10}" for h in heads))
    for r in results:
        share = r.requests_per_second / bare.requests_per_second
        p99 = r.p99_ms / bare.p99_ms if bare.p99_ms else float("nan")
        print(
            f"{r.config:<20} {r.requests_per_second:>10.0f} {share:>10.0%} {r.p50_ms:>10.2f} "
            f"{r.p99_ms:>10.2f} {p99:>9.2f}x {r.errors:>10} {r.first_chunk_p50_ms:>10.2f} "
            f"{r.first_chunk_p99_ms:>10.2f}"
        )
    print(f"load generator: {bare.tool}, {args.connections} connections, {args.seconds} s each")
    print(f"1st: time to the first chunk of a streamed response, ms ({STREAM_REQUESTS} in a row)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
