"""Profile keyguard's full-policy request: ``python -m benchmarks.profiling [asgi|wsgi]``.

Runs the enforcement suite's "Starlette + keyguard" (``asgi``) or "Flask + keyguard"
(``wsgi``) app in-process under :mod:`cProfile` and prints the functions with the
most time of their own, keyguard's first. With ``--tool pyinstrument`` (``pip install
pyinstrument``; not a project dependency) it prints pyinstrument's call tree instead,
which distorts less than a deterministic profiler does for code made of many small
calls. Profilers inflate every call; read the shares, and take absolute figures from
``python -m benchmarks``.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import importlib
import io
import pstats
from collections.abc import Sequence

from keyguard.guard import Guard

from . import enforcement as enf

# Far above what a profiled run reaches; the work per hit does not depend on it.
_UNREACHABLE = "1000000000/minute;1000000000/hour;1000000000/day"


def _keys(count: int) -> tuple[Guard, list[str]]:
    guard = enf.memory_guard()
    saved, enf.RATE = enf.RATE, _UNREACHABLE
    try:
        return guard, enf.issue_keys(guard.backends.keys, count)
    finally:
        enf.RATE = saved


def _cprofile_asgi(requests: int) -> cProfile.Profile:
    guard, keys = _keys(1)
    loop = enf.asgi_loop(enf.starlette_keyguard(guard), keys, enf.ASGISend())

    async def main() -> cProfile.Profile:
        await loop(2000)
        profile = cProfile.Profile()
        profile.enable()
        await loop(requests)
        profile.disable()
        return profile

    return asyncio.run(main())


def _cprofile_wsgi(requests: int) -> cProfile.Profile:
    guard, keys = _keys(1)
    loop = enf.wsgi_loop(enf.flask_keyguard(guard), keys, enf.StartResponse())
    loop(2000)
    profile = cProfile.Profile()
    profile.enable()
    loop(requests)
    profile.disable()
    return profile


def _pyinstrument(kind: str, requests: int) -> str:
    try:
        pyinstrument = importlib.import_module("pyinstrument")
    except ImportError:
        raise SystemExit("pyinstrument is not installed: pip install pyinstrument") from None
    guard, keys = _keys(1)
    profiler = pyinstrument.Profiler(interval=0.0001, async_mode="disabled")
    if kind == "wsgi":
        loop = enf.wsgi_loop(enf.flask_keyguard(guard), keys, enf.StartResponse())
        loop(2000)
        profiler.start()
        loop(requests)
        profiler.stop()
    else:
        aloop = enf.asgi_loop(enf.starlette_keyguard(guard), keys, enf.ASGISend())

        async def main() -> None:
            await aloop(2000)
            profiler.start()
            await aloop(requests)
            profiler.stop()

        asyncio.run(main())
    text: str = profiler.output_text(unicode=True, color=False, show_all=False)
    return text


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profiling", description=__doc__)
    parser.add_argument("kind", choices=("asgi", "wsgi"), nargs="?", default="asgi")
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--tool", choices=("cprofile", "pyinstrument"), default="cprofile")
    parser.add_argument("--top", type=int, default=30, help="rows of the cProfile table")
    args = parser.parse_args(argv)
    if args.tool == "pyinstrument":
        print(_pyinstrument(args.kind, args.requests))
        return 0
    run = _cprofile_asgi if args.kind == "asgi" else _cprofile_wsgi
    profile = run(args.requests)
    out = io.StringIO()
    stats = pstats.Stats(profile, stream=out)
    stats.sort_stats("tottime")
    print(f"{args.requests:,} requests, {args.kind}; functions by own time (keyguard's only):")
    stats.print_stats(r"keyguard", args.top)
    print("\n".join(line for line in out.getvalue().splitlines() if line.strip()))
    out.seek(0)
    out.truncate()
    print("\nall functions by own time:")
    stats.print_stats(args.top)
    print("\n".join(line for line in out.getvalue().splitlines() if line.strip()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
