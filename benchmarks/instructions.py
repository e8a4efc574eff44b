"""Instructions per request, counted by callgrind: ``python -m benchmarks.instructions``.

Timings on a shared machine move by 5-15 % from one run to the next; instruction
counts do not, so they show a change of 1 %. Two counts, each over ``--requests``
requests after a warm-up (``valgrind``: Debian package ``valgrind``; not a project
dependency):

- ``redis-server``'s instructions per admission of the Redis suite's full policy
  (``admit.lua`` with its ten calls, plus the server's own reading and replying),
  the server run under ``callgrind`` and the hits sent by a sync client, each
  carrying the release of the one before, as the async store sends them;
- the Python process's instructions per in-process request of ``app``: ``redis``
  (Starlette + keyguard, full policy on Redis: the suite's b), ``memory`` (the same
  app on the memory stores) or ``bare`` (Starlette alone). The process re-runs itself
  under ``callgrind`` and zeroes the counters around the timed loop.

Instructions are not time: on the core ``redis-server`` shares, Python runs three to
four a nanosecond, ten with warm caches. Compare counts of the same program only.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis as redis_py

from keyguard.backends.redis_limiter import ADMIT_SCRIPT, RedisRateStore
from keyguard.plans import Plan, resolve_policy

from . import enforcement as enf
from .redis import _spec, issue_key, redis_guard

_WARM_UP = 200


def _totals(out: Path) -> int:
    """The largest ``totals:`` of the dumps callgrind wrote next to ``out``."""
    total = 0
    for dump in out.parent.glob(out.name + "*"):
        for line in dump.read_text(errors="replace").splitlines():
            if line.startswith("totals:"):
                total = max(total, int(line.split()[1]))
    return total


def _control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], capture_output=True, check=False)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _start_redis(port: int, *, under_callgrind: Path | None) -> subprocess.Popen[bytes]:
    command = ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"]
    if under_callgrind is not None:
        command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={under_callgrind}"]
        command += ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis_py.Redis(port=port, socket_timeout=60)
    for _ in range(300):  # bounded: valgrind takes a few seconds to start the server
        try:
            client.ping()
            return process
        except redis_py.ConnectionError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("redis-server did not start")


def server_instructions(requests: int) -> float:
    """``redis-server``'s instructions per admission of the full policy."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        port = _free_port()
        server = _start_redis(port, under_callgrind=out)
        try:
            client = redis_py.Redis(port=port, socket_timeout=60)
            sha = client.script_load(ADMIT_SCRIPT)  # loaded once, before the count
            store = RedisRateStore.from_url(f"redis://127.0.0.1:{port}/0", prefix="kgi")
            limits = _spec(cap=True).limits
            policy = resolve_policy(Plan("bench"), limits, "text:generate", None)
            plan = store._plan(policy)
            leases = (f"l{n:08d}" for n in itertools.count())
            previous: list[str] = []

            def admit() -> None:
                lease = next(leases)
                operands = store._call("hit", "bucket", plan, 1, lease, released=previous)
                client.evalsha(sha, *operands)  # type: ignore[arg-type]
                previous[:] = [lease]

            for _ in range(_WARM_UP):
                admit()
            _control("-z", str(server.pid))
            for _ in range(requests):
                admit()
            _control("-d", str(server.pid))
            time.sleep(0.5)
            return _totals(out) / requests
        finally:
            server.terminate()
            server.wait(timeout=30)


async def _child(app_name: str, requests: int) -> None:
    """Inside callgrind: warm up, zero the counters, run ``requests``, dump."""
    port = _free_port()
    server = _start_redis(port, under_callgrind=None) if app_name == "redis" else None
    try:
        if app_name == "redis":
            # The suite's guard, its key cache kept for the whole count: under valgrind
            # the default 5 s would expire several times, each a refresh counted in.
            guard = redis_guard(f"redis://127.0.0.1:{port}/0", cache_ttl=3600)
            key = issue_key(guard.backends.keys, 0)
            app: Any = enf.starlette_keyguard(guard)
        elif app_name == "memory":
            guard = enf.memory_guard()
            key = enf.issue_keys(guard.backends.keys, 1)[0]
            app = enf.starlette_keyguard(guard)
        else:
            key, app = "x", enf.starlette_app()
        loop = enf.asgi_loop(app, [key], enf.ASGISend())
        await loop(_WARM_UP)
        _control("-z", str(os.getpid()))
        await loop(requests)
        _control("-d", str(os.getpid()))
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)


def python_instructions(app_name: str, requests: int) -> float:
    """The Python process's instructions per in-process request of ``app_name``."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
        command += [sys.executable, "-m", "benchmarks.instructions", "--child", app_name]
        command += ["--requests", str(requests)]
        subprocess.run(command, capture_output=True, check=True, timeout=1800)
        return _totals(out) / requests


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.instructions")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--app", choices=("redis", "memory", "bare"), default="redis")
    parser.add_argument("--child", choices=("redis", "memory", "bare"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        asyncio.run(_child(args.child, args.requests))
        return 0
    missing = [
        tool for tool in ("valgrind", "callgrind_control", "redis-server") if not shutil.which(tool)
    ]
    if missing:
        print(f"not found: {', '.join(missing)} (Debian: apt-get install valgrind redis-server)")
        return 2
    print(f"redis-server instructions per admission: {server_instructions(args.requests):,.0f}")
    count = python_instructions(args.app, args.requests)
    print(f"Python instructions per request ({args.app}): {count:,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
