"""Summaries: exact totals, zero-filled series, percentiles and validated queries."""

from __future__ import annotations

import asyncio
import math
import random
from datetime import UTC, datetime
from typing import Any

import pytest

from keyguard.backends.memory_usage import MemoryUsageStore
from keyguard.errors import InvalidInput
from keyguard.testing import FakeClock
from keyguard.usage.histogram import percentile
from keyguard.usage.recorder import UsageRecorder
from keyguard.usage.records import Granularity, UsageEvent
from keyguard.usage.summary import UsageQuery, UsageReader, counts_dict

T0 = 1_798_761_600.0  # 2027-01-01T00:00:00Z
NOW = T0 + 3600


def event(at: float, **changes: Any) -> UsageEvent:
    base = UsageEvent(
        at, "key_1", "acme", "text:generate", "POST", "/v1/generate", 200, 0.01, 1, None, None, "r"
    )
    return base._replace(**changes)


@pytest.fixture
def reader() -> UsageReader:
    store = MemoryUsageStore()
    recorder = UsageRecorder(store)
    for n in range(30):
        recorder.record(event(T0 + 60 * n + 5))
    recorder.record(event(T0 + 120, service="image:create", status=500, units=10))
    recorder.record(event(T0 + 180, key_id="key_2", owner="globex"))
    recorder.record(event(T0 + 240, status=429, reason="quota_exceeded", units=0))
    recorder.close()
    return UsageReader(store, clock=FakeClock(NOW))


def test_totals_add_up_exactly(reader: UsageReader) -> None:
    summary = reader.summary(UsageQuery(key_id="key_1", since="1h"))
    total = counts_dict(summary.total)
    assert (total["requests"], total["errors"], total["denied"], total["units"]) == (32, 2, 1, 40)
    assert total["reasons"] == {"quota_exceeded": 1}
    assert set(summary.by_service) == {"text:generate", "image:create"}


def test_series_has_one_point_per_period_with_gaps_filled(reader: UsageReader) -> None:
    summary = reader.summary(UsageQuery(key_id="key_1", since="1h", granularity="minute"))
    points = summary.series["*"]
    assert len(points) == 61  # [now - 1h, now + 1s) in whole minutes
    assert [p.start for p in points[:3]] == [T0, T0 + 60, T0 + 120]
    assert [p.counts.requests for p in points[:5]] == [1, 1, 2, 1, 2]
    assert points[-1].counts.requests == 0
    assert "image:create" not in summary.series


def test_by_service_adds_a_series_per_service(reader: UsageReader) -> None:
    summary = reader.summary(UsageQuery(key_id="key_1", since="1h", by_service=True))
    assert set(summary.series) == {"*", "text:generate", "image:create"}
    assert sum(p.counts.requests for p in summary.series["image:create"]) == 1
    narrowed = reader.summary(UsageQuery(since="1h", service="image:create"))
    assert narrowed.total.requests == 1


def test_owner_and_everything(reader: UsageReader) -> None:
    assert reader.summary(UsageQuery(owner="globex", since="1h")).total.requests == 1
    assert reader.summary(UsageQuery(since="1h")).total.requests == 33
    assert reader.summary(UsageQuery(key_id=["key_1", "key_2"], since="1h")).total.requests == 33
    assert reader.summary(UsageQuery(key_id="key_none", since="1h")).total.requests == 0


def test_granularity_is_chosen_from_the_span(reader: UsageReader) -> None:
    assert reader.summary(UsageQuery(since="1h")).granularity is Granularity.MINUTE
    assert reader.summary(UsageQuery(since="24h")).granularity is Granularity.HOUR
    assert reader.summary(UsageQuery(since="30d")).granularity is Granularity.DAY
    day = reader.summary(UsageQuery(since="30d"))
    assert day.total.requests == 33


def test_ranges_as_datetimes_and_timestamps(reader: UsageReader) -> None:
    since = datetime.fromtimestamp(T0 + 60, UTC)
    summary = reader.summary(UsageQuery(since=since, until=T0 + 180, granularity="minute"))
    assert [p.counts.requests for p in summary.series["*"]] == [1, 2]


def test_async_face_matches(reader: UsageReader) -> None:
    query = UsageQuery(key_id="key_1", since="1h")
    assert asyncio.run(reader.asummary(query)) == reader.summary(query)
    assert asyncio.run(reader.aerrors("key_1")) == reader.errors("key_1")


def test_error_log_through_the_reader(reader: UsageReader) -> None:
    codes = [e.code for e in reader.errors("key_1")]
    assert codes == ["quota_exceeded", "http_500"]
    assert len(reader.errors("key_1", limit=1)) == 1


@pytest.mark.parametrize(
    ("query", "field"),
    [
        (UsageQuery(since="yesterday"), "since"),
        (UsageQuery(since="1h", until="2h"), "since"),
        (UsageQuery(since=float("nan")), "since"),
        (UsageQuery(since=datetime(2027, 1, 1)), "since"),
        (UsageQuery(since=True), "since"),
        (UsageQuery(granularity="week"), "granularity"),
        (UsageQuery(since="30d", granularity="minute"), "since"),
        (UsageQuery(key_id=""), "key_id"),
        (UsageQuery(key_id="k" * 201), "key_id"),
        (UsageQuery(key_id=["k"] * 1001), "key_id"),
        (UsageQuery(owner=""), "owner"),
        (UsageQuery(service="s" * 201), "service"),
    ],
)
def test_bad_queries_get_a_clear_error(reader: UsageReader, query: UsageQuery, field: str) -> None:
    with pytest.raises(InvalidInput) as raised:
        reader.summary(query)
    assert raised.value.field == field


@pytest.mark.parametrize("limit", [0, 1001, True])
def test_bad_error_limits_are_refused(reader: UsageReader, limit: int) -> None:
    with pytest.raises(InvalidInput):
        reader.errors("key_1", limit=limit)


def test_latency_percentiles_are_within_five_per_cent_of_the_true_values() -> None:
    """A scripted spread of latencies (log-normal, as real ones are) read back."""
    rng = random.Random(7)
    latencies = [rng.lognormvariate(math.log(0.05), 1.0) for _ in range(5000)]
    store = MemoryUsageStore()
    recorder = UsageRecorder(store)
    for n, latency in enumerate(latencies):
        recorder.record(event(T0 + n % 3600, latency=latency))
    recorder.close()
    summary = UsageReader(store, clock=FakeClock(NOW)).summary(UsageQuery(since="1h"))
    ordered = sorted(latencies)
    for share in (0.5, 0.95, 0.99):
        true = ordered[math.ceil(share * len(ordered)) - 1]
        found = percentile(summary.total.latency, share)
        assert found is not None
        assert abs(found - true) <= 0.05 * true
    reported = counts_dict(summary.total)["latency_ms"]
    assert (
        abs(reported["p99"] - ordered[math.ceil(0.99 * 5000) - 1] * 1000) <= 0.05 * reported["p99"]
    )
