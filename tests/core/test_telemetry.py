"""keyguard's OpenTelemetry span and metrics, read back through the SDK's in-memory sinks.

Providers are passed to :class:`Telemetry` explicitly, so no test touches the global
providers (which a process can set only once); the one test of the global default
runs in a subprocess.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import pytest
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from keyguard.backends.memory import MemoryKeyStore
from keyguard.backends.memory_limiter import MemoryRateStore
from keyguard.denials import Denial
from keyguard.errors import ConfigurationError, StorageError
from keyguard.guard import Allow, Guard
from keyguard.limiting import Admission, HitRequest
from keyguard.manager import KeyManager
from keyguard.plans import Plan
from keyguard.records import KeyRecord, LimitOverrides
from keyguard.request import RequestInfo
from keyguard.scopes import RouteMap, RouteRule
from keyguard.telemetry import SPAN_NAME, Telemetry, default_telemetry
from keyguard.testing import FakeClock

PEER = "203.0.113.7"
ROUTES = RouteMap([RouteRule("POST", "/v1/generate", "text:generate")], public=["/health"])
PLANS = {"free": Plan("free", "3/minute;100/hour")}


@dataclass
class Otel:
    """In-memory span and metric sinks, and the telemetry that writes to them."""

    spans: InMemorySpanExporter
    reader: InMemoryMetricReader
    tracer_provider: TracerProvider
    telemetry: Telemetry

    def checks(self) -> list[ReadableSpan]:
        return [s for s in self.spans.get_finished_spans() if s.name == SPAN_NAME]

    def points(self, name: str) -> list[tuple[dict[str, object], object]]:
        """(attributes, data point) of every point of metric ``name``."""
        data = self.reader.get_metrics_data()
        found: list[tuple[dict[str, object], object]] = []
        for resource in data.resource_metrics if data is not None else ():
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == name:
                        found += [(dict(p.attributes or {}), p) for p in metric.data.data_points]
        return found

    def counts(self, name: str) -> dict[tuple[tuple[str, object], ...], int]:
        out: dict[tuple[tuple[str, object], ...], int] = {}
        for attributes, point in self.points(name):
            value = point.count if isinstance(point, HistogramDataPoint) else point.value  # type: ignore[attr-defined]
            out[tuple(sorted(attributes.items()))] = int(value)
        return out


@pytest.fixture
def otel() -> Iterator[Otel]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    meters = MeterProvider(metric_readers=[reader])
    yield Otel(
        exporter, reader, provider, Telemetry(tracer_provider=provider, meter_provider=meters)
    )
    provider.shutdown()
    meters.shutdown()


@dataclass
class World:
    guard: Guard
    keys: MemoryKeyStore
    manager: KeyManager


@pytest.fixture
def world(otel: Otel) -> Iterator[World]:
    clock = FakeClock()
    keys = MemoryKeyStore()
    limiter = MemoryRateStore(clock=clock)
    guard = Guard(
        keys=keys,
        limiter=limiter,
        routes=ROUTES,
        plans=PLANS,
        clock=clock,
        telemetry=otel.telemetry,
    )
    yield World(guard, keys, KeyManager(keys, clock=clock))
    limiter.close()


def req(key: str | None = None, path: str = "/v1/generate") -> RequestInfo:
    headers = () if key is None else ((b"x-api-key", key.encode()),)
    return RequestInfo("POST", path, headers, peer=PEER)


def issue(world: World, scopes: tuple[str, ...] = ("text:generate",), **limits: object) -> str:
    overrides = LimitOverrides(**limits)  # type: ignore[arg-type]
    return world.manager.create("t", scopes=scopes, limits=overrides).key.reveal()


def test_span_is_a_child_of_the_current_span(world: World, otel: Otel) -> None:
    key = issue(world)
    parent_tracer = otel.tracer_provider.get_tracer("server")
    with parent_tracer.start_as_current_span("POST /v1/generate", kind=SpanKind.SERVER) as server:
        world.guard.check(req(key))
        assert trace.get_current_span() is server  # keyguard's span was detached again
    (span,) = otel.checks()
    assert span.kind is SpanKind.INTERNAL
    assert span.parent is not None
    assert span.parent.span_id == server.get_span_context().span_id
    assert span.context is not None
    assert span.context.trace_id == server.get_span_context().trace_id


def test_allow_attributes(world: World, otel: Otel) -> None:
    key = issue(world)
    decision = world.guard.check(req(key))
    assert isinstance(decision, Allow)
    assert decision.identity is not None
    (span,) = otel.checks()
    assert dict(span.attributes or {}) == {
        "keyguard.decision": "allow",
        "keyguard.key.id": decision.identity.key_id,
        "keyguard.auth.method": "header",
        "keyguard.service": "text:generate",
        "keyguard.ratelimit.remaining": 2,  # 3/minute is the tightest window after one hit
        "keyguard.client.address": PEER,
    }
    assert span.status.status_code is StatusCode.UNSET
    assert span.events == ()


def test_public_path_is_an_allow_with_nobody(world: World, otel: Otel) -> None:
    world.guard.check(req(path="/health"))
    (span,) = otel.checks()
    assert dict(span.attributes or {}) == {"keyguard.decision": "allow"}


@pytest.mark.parametrize(
    ("case", "reason", "authenticated"),
    [
        ("missing", "missing_api_key", False),
        ("unknown", "invalid_api_key", False),
        ("scope", "insufficient_permissions", True),
        ("rate", "rate_limit_exceeded", True),
    ],
)
def test_denial_attributes(
    world: World, otel: Otel, case: str, reason: str, authenticated: bool
) -> None:
    if case == "missing":
        info = req()
    elif case == "unknown":
        info = req("kg_live_" + "x" * 40)
    elif case == "scope":
        info = req(issue(world, scopes=("other",)))
    else:
        key = issue(world, rate="1/minute")
        world.guard.check(req(key))
        otel.spans.clear()
        info = req(key)
    decision = world.guard.check(info)
    assert isinstance(decision, Denial)
    assert decision.code == reason
    (span,) = otel.checks()
    attributes = dict(span.attributes or {})
    assert attributes["keyguard.decision"] == "deny"
    assert attributes["keyguard.denial.reason"] == reason
    assert attributes["keyguard.service"] == "text:generate"
    assert attributes["keyguard.client.address"] == PEER
    assert ("keyguard.key.id" in attributes) is authenticated
    assert ("keyguard.auth.method" in attributes) is authenticated
    if case == "rate":
        assert attributes["keyguard.ratelimit.remaining"] == 0
    assert span.status.status_code is StatusCode.UNSET  # a 4xx is the caller's, not ours


def test_metrics_by_decision_reason_and_service(world: World, otel: Otel) -> None:
    key = issue(world)
    world.guard.check(req(key))
    world.guard.check(req(key))
    world.guard.check(req())
    world.guard.check(req(path="/health"))
    expected = {
        (
            ("keyguard.decision", "allow"),
            ("keyguard.reason", "none"),
            ("keyguard.service", "text:generate"),
        ): 2,
        (
            ("keyguard.decision", "deny"),
            ("keyguard.reason", "missing_api_key"),
            ("keyguard.service", "text:generate"),
        ): 1,
        (("keyguard.decision", "allow"), ("keyguard.reason", "none")): 1,
    }
    assert otel.counts("keyguard.requests") == expected
    assert otel.counts("keyguard.check.duration") == expected
    for _, point in otel.points("keyguard.check.duration"):
        assert isinstance(point, HistogramDataPoint)
        assert 0 < point.sum < 1  # seconds
    assert otel.points("keyguard.storage.errors") == []


class FailingLimiter(MemoryRateStore):
    fail_hits = False
    fail_releases = False

    def hit(self, request: HitRequest) -> Admission:
        if self.fail_hits:
            raise StorageError("down")
        return super().hit(request)

    def release(self, bucket: str, lease: str) -> None:
        if self.fail_releases:
            raise StorageError("down")
        super().release(bucket, lease)


class FailingKeys(MemoryKeyStore):
    failure: Exception | None = None

    def find(self, digest: str) -> KeyRecord | None:
        if self.failure is not None:
            raise self.failure
        return super().find(digest)


def test_storage_faults_are_counted(otel: Otel) -> None:
    keys, limiter = FailingKeys(), FailingLimiter()
    manager = KeyManager(keys)
    key = manager.create("t", limits=LimitOverrides(concurrency=5)).key.reveal()
    options: dict[str, object] = {"keys": keys, "limiter": limiter, "plans": PLANS}
    strict = Guard(**options, telemetry=otel.telemetry)  # type: ignore[arg-type]
    lenient = Guard(**options, on_limiter_error="allow", telemetry=otel.telemetry)  # type: ignore[arg-type]
    keys.failure = StorageError("down")
    assert isinstance(strict.check(req(key)), Denial)
    keys.failure = None
    limiter.fail_hits = True
    assert isinstance(strict.check(req(key)), Denial)
    assert isinstance(lenient.check(req(key)), Allow)
    limiter.fail_hits = False
    held = strict.check(req(key))
    assert isinstance(held, Allow)
    assert held.lease is not None
    limiter.fail_releases = True
    strict.release(held.lease)
    assert otel.counts("keyguard.storage.errors") == {
        (("keyguard.store", "keys"),): 1,
        (("keyguard.store", "limits"),): 3,
    }
    spans = otel.checks()
    assert [s.attributes.get("keyguard.storage.error") for s in spans if s.attributes] == [
        "keys",
        "limits",
        "limits",
        None,
    ]
    assert spans[0].status.status_code is StatusCode.ERROR
    assert spans[0].status.description == "key_store_unavailable"
    assert dict(spans[0].attributes or {})["error.type"] == "key_store_unavailable"
    assert dict(spans[2].attributes or {})["keyguard.decision"] == "allow"
    limiter.close()


def test_internal_error_records_no_exception(otel: Otel) -> None:
    keys = FailingKeys()
    key = KeyManager(keys).create("t").key.reveal()
    keys.failure = RuntimeError("a message quoting the request: " + key)
    guard = Guard(keys=keys, plans=PLANS, telemetry=otel.telemetry)
    decision = guard.check(req(key))
    assert isinstance(decision, Denial)
    assert decision.code == "internal_error"
    (span,) = otel.checks()
    assert span.events == ()
    assert span.status.description == "internal_error"
    assert key not in span.to_json()


class SlowKeys(MemoryKeyStore):
    """A store that waits on I/O: the async face awaits it instead of calling inline."""

    in_process: ClassVar[bool] = False
    gate: asyncio.Event | None = None

    async def afind(self, digest: str) -> KeyRecord | None:
        if self.gate is not None:
            await self.gate.wait()
        return self.find(digest)


def test_async_check_is_a_child_and_cancellation_ends_the_span(otel: Otel) -> None:
    keys = SlowKeys()
    key = KeyManager(keys).create("t").key.reveal()
    guard = Guard(keys=keys, plans=PLANS, telemetry=otel.telemetry)
    assert not guard.inline
    tracer = otel.tracer_provider.get_tracer("server")

    async def scenario() -> None:
        with tracer.start_as_current_span("server") as server:
            assert isinstance(await guard.acheck(req(key)), Allow)
            assert trace.get_current_span() is server
            keys.gate = asyncio.Event()
            task = asyncio.ensure_future(guard.acheck(req(key)))
            await asyncio.sleep(0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert trace.get_current_span() is server

    asyncio.run(scenario())
    done, cancelled = otel.checks()
    assert done.parent is not None
    assert dict(done.attributes or {})["keyguard.auth.method"] == "header"
    assert cancelled.end_time is not None
    assert "keyguard.decision" not in dict(cancelled.attributes or {})
    assert otel.counts("keyguard.requests") == {
        (("keyguard.decision", "allow"), ("keyguard.reason", "none")): 1
    }


def test_client_address_can_be_left_out(otel: Otel) -> None:
    telemetry = Telemetry(tracer_provider=otel.tracer_provider, client_address=False)
    keys = MemoryKeyStore()
    key = KeyManager(keys).create("t").key.reveal()
    Guard(keys=keys, plans=PLANS, telemetry=telemetry).check(req(key))
    (span,) = otel.checks()
    assert "keyguard.client.address" not in dict(span.attributes or {})


@pytest.mark.parametrize("off", [None, False])
def test_telemetry_off(otel: Otel, off: bool | None) -> None:
    guard = Guard(keys=MemoryKeyStore(), plans=PLANS, telemetry=off)
    assert guard.telemetry is None
    guard.check(req())
    assert otel.checks() == []


def test_no_sdk_means_nothing_to_observe() -> None:
    """With no SDK provider set (as in this process) a check skips all telemetry.

    The look relies on two names private to opentelemetry-api; if an upgrade renames
    them, keyguard still works (it records through the no-op proxies, just slower),
    and this test says so.
    """
    telemetry = default_telemetry()
    assert hasattr(trace, "_TRACER_PROVIDER")
    assert hasattr(telemetry.requests, "_real_instrument")
    assert telemetry.begin() is None


def test_telemetry_option_is_checked() -> None:
    assert Guard(keys=MemoryKeyStore(), plans=PLANS).telemetry is default_telemetry()
    with pytest.raises(ConfigurationError, match="telemetry"):
        Guard(keys=MemoryKeyStore(), plans=PLANS, telemetry="on")  # type: ignore[arg-type]


def test_default_telemetry_follows_global_providers_set_later() -> None:
    """The default reports to providers configured after the guard was built."""
    script = textwrap.dedent(
        """
        from opentelemetry import metrics, trace
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
            InMemorySpanExporter,
        )
        from keyguard.backends.memory import MemoryKeyStore
        from keyguard.guard import Guard
        from keyguard.request import RequestInfo

        def requests():
            data = reader.get_metrics_data()
            return [
                p.value
                for r in data.resource_metrics
                for s in r.scope_metrics
                for m in s.metrics
                if m.name == "keyguard.requests"
                for p in m.data.data_points
            ]

        guard = Guard(keys=MemoryKeyStore())
        assert guard.telemetry.begin() is None  # no SDK yet: nothing to see
        guard.check(RequestInfo("GET", "/"))
        exporter, reader = InMemorySpanExporter(), InMemoryMetricReader()
        metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
        guard.check(RequestInfo("GET", "/"))  # metrics only
        assert requests() == [1], requests()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        guard.check(RequestInfo("GET", "/"))
        (span,) = exporter.get_finished_spans()
        assert span.attributes["keyguard.denial.reason"] == "missing_api_key"
        assert requests() == [2], requests()
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
