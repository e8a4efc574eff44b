"""Latency histograms: percentiles within one per cent, merging exact."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from keyguard.usage.histogram import bucket_of, from_pairs, merge_into, percentile, value_of

latencies = st.floats(min_value=1e-6, max_value=100.0, allow_nan=False)


def true_percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(share * len(ordered))) - 1]


@given(st.lists(latencies, min_size=1, max_size=300), st.sampled_from([0.5, 0.95, 0.99, 1.0]))
def test_percentile_is_within_one_per_cent_of_the_true_value(
    values: list[float], share: float
) -> None:
    histogram: dict[int, int] = {}
    for value in values:
        bucket = bucket_of(value)
        histogram[bucket] = histogram.get(bucket, 0) + 1
    found = percentile(histogram, share)
    assert found is not None
    assert abs(found - true_percentile(values, share)) <= 0.0101 * true_percentile(values, share)


@given(latencies)
def test_a_value_falls_in_the_bucket_whose_middle_is_near_it(value: float) -> None:
    assert abs(value_of(bucket_of(value)) - value) <= 0.0101 * value


@given(
    st.lists(st.tuples(st.integers(0, 1000), st.integers(1, 50))),
    st.lists(st.tuples(st.integers(0, 1000), st.integers(1, 50))),
)
def test_merging_adds_counts_bucket_by_bucket(
    left: list[tuple[int, int]], right: list[tuple[int, int]]
) -> None:
    merged = from_pairs(left)
    merge_into(merged, from_pairs(right))
    assert merged == from_pairs(left + right)
    assert sum(merged.values()) == sum(c for _, c in left + right)


def test_sub_microsecond_and_empty() -> None:
    assert bucket_of(0.0) == 0
    assert bucket_of(-1.0) == 0
    assert percentile({}, 0.5) is None
