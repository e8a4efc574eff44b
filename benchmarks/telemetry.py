"""Telemetry: what keyguard's OpenTelemetry span and metrics add to one check.

``python -m benchmarks.telemetry [--quick]`` times ``Guard.check`` (plus the release
of its concurrency slot) for the allowed request of ``benchmarks/breakdown.py``
(memory stores, the enforcement suite's full policy), with:

- **telemetry off** (``telemetry=None``): the baseline;
- **on, no SDK**: the default, the API's global providers with no SDK configured,
  as an app that never sets one up runs;
- **on, SDK, sampled out**: an SDK ``TracerProvider`` whose sampler drops every
  span, and an SDK ``MeterProvider`` with an in-memory reader;
- **on, SDK, recording**: the same with every span recorded, through a
  ``SimpleSpanProcessor`` into an ``InMemorySpanExporter`` (cleared after each
  repeat), so no network or batching cost is counted.

The loops are timed interleaved (see ``benchmarks/_harness.py``), so a slow spell of
the machine lands on all of them; figures are medians of the repeats.
"""

from __future__ import annotations

from collections.abc import Callable

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

from keyguard.adapters.asgi import request_from_scope
from keyguard.guard import Allow
from keyguard.telemetry import Telemetry, default_telemetry

from . import enforcement as enf
from ._harness import Settings, SuiteReport, measure_many, run_standalone
from .breakdown import _guard_and_key

__all__ = ["run"]

SUITE = "telemetry"
OFF = "Guard.check, telemetry off (telemetry=None)"
NO_SDK = "Guard.check, telemetry on, no SDK (default)"
SAMPLED_OUT = "Guard.check, telemetry on, SDK, span sampled out"
RECORDING = "Guard.check, telemetry on, SDK, span recorded (in-memory)"


def _loop(telemetry: Telemetry | None, after: Callable[[], object] | None) -> Callable[[int], None]:
    """A guard of its own checking one key's allowed request ``n`` times.

    ``after`` runs once per batch (clearing the exporter). The key's windows are out of
    reach, as in the breakdown suite: the work per hit is the same.
    """
    guard, key, _ = _guard_and_key()
    guard.telemetry = telemetry
    request = request_from_scope({**enf.scope_base(), "headers": enf.request_headers(key)})

    def loop(n: int) -> None:
        for _ in range(n):
            decision = guard.check(request)
            if not isinstance(decision, Allow):
                raise enf.Refused(f"the guard refused: {decision}")
            if decision.lease is not None:
                guard.release(decision.lease)
        if after is not None:
            after()

    return loop


def run(settings: Settings) -> SuiteReport:
    """Measure the suite; see the module docstring."""
    report = SuiteReport(SUITE)
    exporter = InMemorySpanExporter()
    recording = TracerProvider()
    recording.add_span_processor(SimpleSpanProcessor(exporter))
    meters = MeterProvider(metric_readers=[InMemoryMetricReader()])
    dropping = TracerProvider(sampler=ALWAYS_OFF)
    loops: dict[str, Callable[[int], object]] = {}
    for name, telemetry, after in [
        (OFF, None, None),
        (NO_SDK, default_telemetry(), None),
        (SAMPLED_OUT, Telemetry(tracer_provider=dropping, meter_provider=meters), None),
        (RECORDING, Telemetry(tracer_provider=recording, meter_provider=meters), exporter.clear),
    ]:
        loops[name] = _loop(telemetry, after)
    timings = measure_many(loops, settings)
    for name, timing in timings.items():
        report.add(name, timing)
    off = timings[OFF].median
    report.derive("added by telemetry, no SDK", timings[NO_SDK].median - off, "µs", target=2.0)
    report.derive("added by telemetry, SDK, sampled out", timings[SAMPLED_OUT].median - off, "µs")
    report.derive("added by telemetry, SDK, recorded", timings[RECORDING].median - off, "µs")
    for provider in (recording, dropping):
        provider.shutdown()
    meters.shutdown()
    return report


def main() -> None:
    run_standalone(run, __doc__)


if __name__ == "__main__":
    main()
