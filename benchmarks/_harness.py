"""Timing loops, results and the report shared by every benchmark suite.

Each benchmark is a *loop*: a callable that performs ``n`` operations. The harness
warms it up (at least ``warmup_seconds`` and at least ``min_warmup`` operations),
calibrates ``n`` so one repeat lasts about ``target_seconds``, then times
``repeats`` runs of ``n`` operations with :func:`time.perf_counter_ns` and reports
the median cost of one operation in microseconds. The garbage collector stays on
(its cost is part of a request's cost), but a full collection runs before every
repeat so that one repeat does not pay for the garbage of another.

Figures that are compared with each other (a bare app and the same app behind each
limiter) are measured *interleaved* by :func:`measure_many`: every loop is warmed up
and calibrated, then each round times every loop once, so a slow spell of the
machine lands on all of them rather than on one.

Async loops run inside the caller's event loop: a suite calls :func:`ameasure`
from within one ``asyncio.run``, so no request pays for starting a loop.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

__all__ = [
    "Derived",
    "Result",
    "Settings",
    "SuiteReport",
    "Timing",
    "ameasure",
    "ameasure_many",
    "measure",
    "measure_many",
]

Loop = Callable[[int], object]
AsyncLoop = Callable[[int], Awaitable[object]]


@dataclass(frozen=True, slots=True)
class Settings:
    """How long and how often to measure; ``quick`` also shrinks the data sizes."""

    quick: bool
    repeats: int
    target_seconds: float
    warmup_seconds: float

    @classmethod
    def make(cls, *, quick: bool) -> Settings:
        if quick:
            return cls(quick=True, repeats=3, target_seconds=0.05, warmup_seconds=0.02)
        return cls(quick=False, repeats=11, target_seconds=0.15, warmup_seconds=0.1)


@dataclass(frozen=True, slots=True)
class Timing:
    """Microseconds per operation of each repeat, and operations per repeat."""

    samples: tuple[float, ...]
    ops: int

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def best(self) -> float:
        return min(self.samples)

    @property
    def worst(self) -> float:
        return max(self.samples)


@dataclass(frozen=True, slots=True)
class Result:
    """One measured figure: the median microseconds per operation and its spread."""

    suite: str
    name: str
    timing: Timing
    note: str = ""

    @property
    def us(self) -> float:
        return self.timing.median

    def as_json(self) -> dict[str, object]:
        return {
            "suite": self.suite,
            "name": self.name,
            "us_per_op": round(self.timing.median, 4),
            "best_us": round(self.timing.best, 4),
            "worst_us": round(self.timing.worst, 4),
            "ops_per_repeat": self.timing.ops,
            "repeats": len(self.timing.samples),
            "samples_us": [round(s, 4) for s in self.timing.samples],
            "note": self.note,
        }


@dataclass(frozen=True, slots=True)
class Derived:
    """A figure computed from results: an added cost, a ratio, a spread.

    ``target`` is the limit the figure should stay at or under; ``met`` says whether
    it did (``None`` when there is no target).
    """

    suite: str
    name: str
    value: float
    unit: str
    target: float | None = None
    note: str = ""

    @property
    def met(self) -> bool | None:
        return None if self.target is None else self.value <= self.target

    def as_json(self) -> dict[str, object]:
        return {
            "suite": self.suite,
            "name": self.name,
            "value": round(self.value, 4),
            "unit": self.unit,
            "target": self.target,
            "met": self.met,
            "note": self.note,
        }


@dataclass(slots=True)
class SuiteReport:
    """What one suite measured."""

    suite: str
    results: list[Result] = field(default_factory=list)
    derived: list[Derived] = field(default_factory=list)

    def add(self, name: str, timing: Timing, note: str = "") -> Result:
        result = Result(self.suite, name, timing, note)
        self.results.append(result)
        return result

    def derive(
        self, name: str, value: float, unit: str, *, target: float | None = None, note: str = ""
    ) -> Derived:
        figure = Derived(self.suite, name, value, unit, target, note)
        self.derived.append(figure)
        return figure


def _elapsed_ns(loop: Loop, n: int) -> int:
    start = time.perf_counter_ns()
    loop(n)
    return time.perf_counter_ns() - start


async def _aelapsed_ns(loop: AsyncLoop, n: int) -> int:
    start = time.perf_counter_ns()
    await loop(n)
    return time.perf_counter_ns() - start


def _ops_for(per_op_ns: float, settings: Settings, max_ops: int | None) -> int:
    ops = max(10, int(settings.target_seconds * 1e9 / max(per_op_ns, 1.0)))
    return ops if max_ops is None else min(ops, max_ops)


def measure(
    loop: Loop, settings: Settings, *, min_warmup: int = 0, max_ops: int | None = None
) -> Timing:
    """Warm up, calibrate and time a synchronous loop (at most ``max_ops`` per repeat)."""
    ops = _warm(loop, settings, min_warmup, max_ops)
    samples = []
    for _ in range(settings.repeats):
        gc.collect()
        samples.append(_elapsed_ns(loop, ops) / ops / 1000)
    return Timing(tuple(samples), ops)


async def ameasure(
    loop: AsyncLoop, settings: Settings, *, min_warmup: int = 0, max_ops: int | None = None
) -> Timing:
    """Warm up, calibrate and time an async loop, inside the running event loop."""
    ops = await _awarm(loop, settings, min_warmup, max_ops)
    samples = []
    for _ in range(settings.repeats):
        gc.collect()
        samples.append(await _aelapsed_ns(loop, ops) / ops / 1000)
    return Timing(tuple(samples), ops)


def _warming(
    spent: int, done: int, settings: Settings, min_warmup: int, max_ops: int | None
) -> bool:
    """Warm up for ``warmup_seconds``, but never more than three repeats' worth of
    operations when ``max_ops`` caps them (a rate-limited loop must not run long),
    and always for at least ``min_warmup`` operations."""
    if done < min_warmup:
        return True
    if max_ops is not None and done >= 3 * max_ops:
        return False
    return spent < settings.warmup_seconds * 1e9


def _next_chunk(n: int, done: int, min_warmup: int, max_ops: int | None) -> int:
    """The next warm-up run: doubling, up to what ``min_warmup`` still needs, and
    never more than ``max_ops`` once that is met."""
    if done < min_warmup:
        return max(8, min(n * 2, min_warmup - done))
    return n * 2 if max_ops is None else min(n * 2, max_ops)


def _warm(loop: Loop, settings: Settings, min_warmup: int, max_ops: int | None) -> int:
    n, spent, done, per_op = 8, 0, 0, 1.0
    while _warming(spent, done, settings, min_warmup, max_ops):
        elapsed = _elapsed_ns(loop, n)
        spent += elapsed
        done += n
        per_op = elapsed / n
        n = _next_chunk(n, done, min_warmup, max_ops)
    return _ops_for(per_op, settings, max_ops)


async def _awarm(loop: AsyncLoop, settings: Settings, min_warmup: int, max_ops: int | None) -> int:
    n, spent, done, per_op = 8, 0, 0, 1.0
    while _warming(spent, done, settings, min_warmup, max_ops):
        elapsed = await _aelapsed_ns(loop, n)
        spent += elapsed
        done += n
        per_op = elapsed / n
        n = _next_chunk(n, done, min_warmup, max_ops)
    return _ops_for(per_op, settings, max_ops)


def measure_many(
    loops: dict[str, Loop], settings: Settings, *, max_ops: int | None = None
) -> dict[str, Timing]:
    """Time several synchronous loops interleaved, round by round."""
    ops = {name: _warm(loop, settings, 0, max_ops) for name, loop in loops.items()}
    samples: dict[str, list[float]] = {name: [] for name in loops}
    for _ in range(settings.repeats):
        for name, loop in loops.items():
            gc.collect()
            samples[name].append(_elapsed_ns(loop, ops[name]) / ops[name] / 1000)
    return {name: Timing(tuple(samples[name]), ops[name]) for name in loops}


async def ameasure_many(
    loops: dict[str, AsyncLoop],
    settings: Settings,
    *,
    max_ops: int | None = None,
    min_warmup: Mapping[str, int] | None = None,
) -> dict[str, Timing]:
    """Time several async loops interleaved, round by round, in the running loop."""
    least = min_warmup or {}
    ops = {
        name: await _awarm(loop, settings, least.get(name, 0), max_ops)
        for name, loop in loops.items()
    }
    samples: dict[str, list[float]] = {name: [] for name in loops}
    for _ in range(settings.repeats):
        for name, loop in loops.items():
            gc.collect()
            samples[name].append(await _aelapsed_ns(loop, ops[name]) / ops[name] / 1000)
    return {name: Timing(tuple(samples[name]), ops[name]) for name in loops}


def run_standalone(run: Callable[[Settings], SuiteReport], doc: str | None) -> None:
    """``python -m benchmarks.<suite> [--quick]``: run one suite and print its table."""
    import argparse

    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter repeats")
    args = parser.parse_args()
    report = run(Settings.make(quick=args.quick))
    width = max(len(r.name) for r in report.results)
    print(f"{'benchmark':<{width}}  {'µs/op':>8}  {'best':>8}  {'worst':>8}")
    for result in report.results:
        t = result.timing
        print(f"{result.name:<{width}}  {t.median:8.2f}  {t.best:8.2f}  {t.worst:8.2f}")
    for figure in report.derived:
        print(f"{figure.name}: {figure.value:.2f} {figure.unit}")
