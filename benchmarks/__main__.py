"""``python -m benchmarks [--quick] [--only NAME] [--json]``: run the suites, print tables.

``--quick`` shrinks the data (100,000 instead of 1,000,000 stored keys, 10,000
instead of 100,000 distinct keys) and the repeats, for a smoke run; quote figures
from a full run only. ``--json`` prints one JSON document instead of the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path

from ._harness import Derived, Result, Settings, SuiteReport

SUITES: dict[str, str] = {
    "keys": "key parse + checksum + digest, and store lookups at 1k and 1M keys",
    "enforcement": "per-request cost next to bare apps, slowapi and Flask-Limiter",
    "breakdown": "keyguard's decision stage by stage (where the time goes)",
    "redis": "keyguard vs slowapi on Redis: cost, round trips, uvicorn req/s, exactness",
}
_PACKAGES = (
    "keyguard",
    "starlette",
    "anyio",
    "flask",
    "werkzeug",
    "slowapi",
    "flask-limiter",
    "limits",
    "pydantic",
    "redis",
    "uvicorn",
)


def _runner(name: str) -> Callable[[Settings], SuiteReport]:
    if name == "keys":
        from . import keys

        return keys.run
    if name == "breakdown":
        from . import breakdown

        return breakdown.run
    if name == "redis":
        from . import redis

        return redis.run
    from . import enforcement

    return enforcement.run


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment() -> dict[str, object]:
    """The machine and the versions the figures belong to."""
    versions: dict[str, str] = {}
    for package in _PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    affinity = getattr(os, "sched_getaffinity", None)
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return {
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(affinity(0)) if affinity is not None else os.cpu_count(),
        "load_average_1m": round(load[0], 2),
        "keyguard_source": _source_fingerprint(),
        "versions": versions,
    }


def _source_fingerprint() -> str:
    """The commit the tree is on, and a hash of keyguard's sources as they are now.

    Read without git (whose status would touch the index): figures taken on a tree
    with uncommitted changes still name the exact code they measured.
    """
    import hashlib

    import keyguard

    root = Path(keyguard.__file__).resolve().parent
    digest = hashlib.sha256()
    for file in sorted(root.rglob("*.py")):
        digest.update(file.relative_to(root).as_posix().encode() + b"\0" + file.read_bytes())
    head = "unknown"
    git = root.parents[1] / ".git"
    try:
        ref = (git / "HEAD").read_text().strip()
        if ref.startswith("ref: "):
            name = ref[5:]
            loose = git / name
            if loose.exists():
                ref = loose.read_text().strip()
            else:  # packed: "<sha> <name>" lines
                packed = (git / "packed-refs").read_text().splitlines()
                ref = next((ln.split()[0] for ln in packed if ln.endswith(" " + name)), "")
        head = ref[:12] or head
    except OSError:
        pass
    return f"commit {head}, sources sha256 {digest.hexdigest()[:12]}"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def _results_table(results: Sequence[Result]) -> str:
    rows = [
        [
            r.name,
            f"{r.timing.median:.3f}",
            f"{r.timing.best:.3f}",
            f"{r.timing.worst:.3f}",
            f"{r.timing.ops:,}x{len(r.timing.samples)}",
            r.note,
        ]
        for r in results
    ]
    return _table(["benchmark", "µs/op", "best", "worst", "ops x rep", "note"], rows, {1, 2, 3, 4})


def _verdict(figure: Derived) -> str:
    if figure.met is None:
        return ""
    return "met" if figure.met else "MISSED"


def _derived_table(figures: Sequence[Derived]) -> str:
    rows = [
        [
            f.name,
            f"{f.value:.3f} {f.unit}",
            "" if f.target is None else f"<= {f.target:g} {f.unit}",
            _verdict(f),
            f.note,
        ]
        for f in figures
    ]
    return _table(["figure", "value", "target", "verdict", "note"], rows, {1})


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller data, fewer repeats")
    parser.add_argument(
        "--only", choices=sorted(SUITES), action="append", help="run only this suite (repeatable)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    args = parser.parse_args(argv)
    settings = Settings.make(quick=args.quick)
    names = [n for n in SUITES if args.only is None or n in args.only]
    env = environment()
    if not args.json:
        print(f"keyguard benchmarks ({'quick' if args.quick else 'full'} run)")
        print(f"python {env['python']} on {env['platform']}")
        print(
            f"cpu {env['cpu']}; {env['cpu_count']} CPUs ({env['cpus_usable']} usable); "
            f"load average {env['load_average_1m']}"
        )
        print(f"keyguard {env['keyguard_source']}")
        versions = env["versions"]
        assert isinstance(versions, dict)
        print("versions " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    reports = []
    failed: dict[str, str] = {}
    started = time.perf_counter()
    for name in names:
        if not args.json:
            print(f"\n== {name}: {SUITES[name]}", flush=True)
        suite_start = time.perf_counter()
        try:
            report = _runner(name)(settings)
        except Exception as exc:  # one broken suite must not hide the others' figures
            failed[name] = f"{type(exc).__name__}: {exc}"
            print(f"suite {name} failed: {failed[name]}", file=sys.stderr, flush=True)
            continue
        reports.append(report)
        if not args.json:
            print(_results_table(report.results))
            print()
            print(_derived_table(report.derived))
            print(f"({name} took {time.perf_counter() - suite_start:.0f} s)", flush=True)
    elapsed = time.perf_counter() - started
    if args.json:
        document = {
            "mode": "quick" if args.quick else "full",
            "environment": env,
            "seconds": round(elapsed, 1),
            "results": [r.as_json() for rep in reports for r in rep.results],
            "derived": [d.as_json() for rep in reports for d in rep.derived],
            "failed": failed,
        }
        json.dump(document, sys.stdout, indent=2, ensure_ascii=False)
        print()
    else:
        missed = [d for rep in reports for d in rep.derived if d.met is False]
        print(f"\ntotal {elapsed:.0f} s; targets missed: {len(missed)}")
        for figure in missed:
            print(f"  MISSED {figure.name}: {figure.value:.3f} {figure.unit} > {figure.target:g}")
        for name, error in failed.items():
            print(f"  FAILED suite {name}: {error}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
