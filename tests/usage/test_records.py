"""Usage counts: what an event adds, exact merging, and a lossless JSON form."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from keyguard.usage.histogram import bucket_of
from keyguard.usage.records import ErrorEntry, Granularity, UsageCounts, UsageEvent

T0 = 1_798_761_600.0

events = st.builds(
    UsageEvent,
    at=st.floats(T0, T0 + 86400 * 3),
    key_id=st.sampled_from(["key_a", "key_b"]),
    owner=st.sampled_from([None, "acme"]),
    service=st.sampled_from([None, "text:generate", "image:create"]),
    method=st.just("POST"),
    route=st.just("/v1/generate"),
    status=st.sampled_from([200, 201, 302, 400, 403, 429, 500, 503]),
    latency=st.floats(1e-6, 10.0),
    units=st.integers(0, 1000),
    reason=st.sampled_from([None, "rate_limit_exceeded", "quota_exceeded"]),
    client_ip=st.just("127.0.0.1"),
    request_id=st.just("r"),
)


def added(batch: list[UsageEvent]) -> UsageCounts:
    counts = UsageCounts()
    for event in batch:
        counts.add(event, bucket_of(event.latency))
    return counts


@given(st.lists(events, max_size=40), st.lists(events, max_size=40))
def test_merging_two_counts_equals_counting_both_batches(
    left: list[UsageEvent], right: list[UsageEvent]
) -> None:
    merged = added(left)
    merged.merge(added(right))
    both = added(left + right)
    assert merged.requests == both.requests == len(left) + len(right)
    assert (merged.errors, merged.denied, merged.units) == (both.errors, both.denied, both.units)
    assert merged.statuses == both.statuses
    assert merged.reasons == both.reasons
    assert merged.latency == both.latency


@given(st.lists(events, max_size=40))
def test_counts_round_trip_through_json(batch: list[UsageEvent]) -> None:
    counts = added(batch)
    assert UsageCounts.from_json(counts.to_json()) == counts


def test_errors_are_status_400_and_up_or_refusals() -> None:
    base = UsageEvent(T0, "k", None, None, "GET", "/", 200, 0.01, 1, None, None, "r")
    counts = added(
        [
            base,
            base._replace(status=302),
            base._replace(status=404),
            base._replace(status=503),
            base._replace(status=429, reason="rate_limit_exceeded"),
        ]
    )
    assert (counts.requests, counts.errors, counts.denied) == (5, 3, 1)
    assert counts.statuses == {"2xx": 1, "3xx": 1, "4xx": 2, "5xx": 1}


def test_error_entries_round_trip_through_json() -> None:
    entry = ErrorEntry(T0, "key_é", "ácme", None, "GET", "/v1/x", 500, "http_500", "Oops", "r-1")
    assert ErrorEntry.from_json(entry.to_json()) == entry


def test_granularity_floors_to_utc_periods() -> None:
    at = T0 + 86400 + 3600 * 5 + 61.5
    assert Granularity.MINUTE.floor(at) == T0 + 86400 + 3600 * 5 + 60
    assert Granularity.HOUR.floor(at) == T0 + 86400 + 3600 * 5
    assert Granularity.DAY.floor(at) == T0 + 86400
