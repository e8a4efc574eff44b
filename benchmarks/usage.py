"""Usage recording: what counting each request per key, service and minute adds.

``python -m benchmarks.usage [--quick]`` times one allowed request through the
enforcement suite's apps (memory stores, the full policy: key, scope, three windows,
two quotas, a concurrency cap), with:

- **usage off** (``usage=None``): the baseline;
- **usage on**: a :class:`~keyguard.usage.UsageRecorder` on an in-memory usage store,
  its flusher thread aggregating and writing every second while the loop runs (so
  the aggregation's share of the GIL is in the figure);
- **usage on + telemetry, SDK recording**: the same with OpenTelemetry's SDK
  recording every span into an in-memory exporter and metrics into an in-memory
  reader: the whole observability bill.

Through Starlette (ASGI) and Flask (WSGI). The loops are timed interleaved; figures
are medians of the repeats.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from keyguard.backends.memory_usage import MemoryUsageStore
from keyguard.guard import Guard
from keyguard.telemetry import Telemetry
from keyguard.usage.recorder import UsageRecorder

from . import enforcement as enf
from ._harness import (
    AsyncLoop,
    Loop,
    Settings,
    SuiteReport,
    Timing,
    ameasure_many,
    measure_many,
    run_standalone,
)

__all__ = ["run"]

SUITE = "usage"
ASGI_OFF = "Starlette + keyguard, usage off"
ASGI_ON = "Starlette + keyguard, usage on (memory store)"
ASGI_ALL = "Starlette + keyguard, usage on + telemetry SDK recording"
WSGI_OFF = "Flask + keyguard, usage off"
WSGI_ON = "Flask + keyguard, usage on (memory store)"
WSGI_ALL = "Flask + keyguard, usage on + telemetry SDK recording"


def _guard(usage: bool, telemetry: Telemetry | None) -> tuple[Guard, str]:
    guard = enf.memory_guard()
    guard.telemetry = telemetry
    if usage:
        guard.usage = UsageRecorder(MemoryUsageStore())
    return guard, enf.issue_keys(guard.backends.keys, 1)[0]


def _clearing(inner: AsyncLoop, clear: Callable[[], object]) -> AsyncLoop:
    """The loop, then the span exporter emptied, so memory stays flat across repeats."""

    async def loop(n: int) -> None:
        await inner(n)
        clear()

    return loop


def run(settings: Settings) -> SuiteReport:
    """Measure the suite; see the module docstring."""
    report = SuiteReport(SUITE)
    exporter = InMemorySpanExporter()
    tracing = TracerProvider()
    tracing.add_span_processor(SimpleSpanProcessor(exporter))
    meters = MeterProvider(metric_readers=[InMemoryMetricReader()])
    sdk = Telemetry(tracer_provider=tracing, meter_provider=meters)
    configs = {"off": (False, None), "on": (True, None), "all": (True, sdk)}
    guards = {name: _guard(*config) for name, config in configs.items()}

    async def asgi() -> dict[str, Timing]:
        loops: dict[str, AsyncLoop] = {}
        for label, name in ((ASGI_OFF, "off"), (ASGI_ON, "on"), (ASGI_ALL, "all")):
            guard, key = guards[name]
            inner = enf.asgi_loop(enf.starlette_keyguard(guard), [key], enf.ASGISend())
            loops[label] = _clearing(inner, exporter.clear)
        return await ameasure_many(loops, settings, max_ops=enf.MAX_OPS)

    timings = asyncio.run(asgi())
    wsgi_loops: dict[str, Loop] = {}
    for label, name in ((WSGI_OFF, "off"), (WSGI_ON, "on"), (WSGI_ALL, "all")):
        guard, key = guards[name]
        wsgi_loops[label] = enf.wsgi_loop(enf.flask_keyguard(guard), [key], enf.StartResponse())
    timings.update(measure_many(wsgi_loops, settings, max_ops=enf.MAX_OPS))
    for label, timing in timings.items():
        report.add(label, timing)
    for face, off, on, whole in (
        ("Starlette", ASGI_OFF, ASGI_ON, ASGI_ALL),
        ("Flask", WSGI_OFF, WSGI_ON, WSGI_ALL),
    ):
        base = timings[off].median
        report.derive(
            f"added by usage recording ({face})", timings[on].median - base, "µs", target=5.0
        )
        report.derive(
            f"added by usage + telemetry SDK ({face})", timings[whole].median - base, "µs"
        )
    for guard, _ in guards.values():
        if guard.usage is not None:
            guard.usage.close()
    tracing.shutdown()
    meters.shutdown()
    return report


def main() -> None:
    run_standalone(run, __doc__)


if __name__ == "__main__":
    main()
