"""The limiter's hot path: one ``hit`` plus one ``release``, as every capped request pays.

``python -m benchmarks.limiter_hot_path [--quick]`` prints the cost in microseconds of
a ``hit`` + ``release`` on one bucket for a policy of three windows (minute, hour,
day), a monthly quota and a concurrency cap, on the memory store and on the SQLite
store (a file in a temporary directory). Each repeat uses a fresh store, so the
windows never fill up and every hit is admitted; the figure is the best of the
repeats (the least disturbed by the rest of the machine), the median follows it.
Target: about 5 µs on the memory store, whose whole middleware budget is ~20 µs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from keyguard.backends.memory_limiter import MemoryRateStore
from keyguard.backends.sqlite_limiter import SQLiteRateStore
from keyguard.limiting import HitRequest, RateStore
from keyguard.windows import policy_from_strings

POLICY = policy_from_strings("60000/minute;1000000/hour;10000000/day", None, 10**12, 1000)
WARMUP = 1000


def per_op(store: RateStore, n: int) -> float:
    """Microseconds per hit + release, after a warm-up, on ``store``."""

    def one() -> None:
        store.hit(HitRequest("key_1", POLICY, 1, "abc"))
        store.release("key_1", "abc")

    for _ in range(WARMUP):
        one()
    start = time.perf_counter()
    for _ in range(n):
        one()
    return (time.perf_counter() - start) / n * 1e6


def repeat(make: Callable[[int], RateStore], n: int, repeats: int) -> list[float]:
    """``per_op`` on ``repeats`` fresh stores (``WARMUP + n`` hits stay under the minute's
    limit on each, so the figure is always the cost of an admission)."""
    figures = []
    for i in range(repeats):
        store = make(i)
        try:
            figures.append(per_op(store, n))
        finally:
            store.close()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    quick = parser.parse_args().quick
    with tempfile.TemporaryDirectory() as tmp:
        rows = [
            ("memory", repeat(lambda _: MemoryRateStore(), 20_000, 3 if quick else 7)),
            (
                "sqlite",
                repeat(
                    lambda i: SQLiteRateStore(Path(tmp) / f"rl{i}.db"),
                    1_000 if quick else 5_000,
                    2 if quick else 3,
                ),
            ),
        ]
    print("limiter hit + release (3 windows, monthly quota, concurrency cap)")
    for name, figures in rows:
        best, median = min(figures), statistics.median(figures)
        print(f"  {name:<7} {best:8.2f} µs per hit+release  (median {median:.2f} µs)")


if __name__ == "__main__":
    main()
