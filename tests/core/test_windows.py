"""The pure limit arithmetic: sliding windows, UTC quotas, leases and policy strings."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keyguard.errors import ConfigurationError
from keyguard.limiting import (
    HitRequest,
    LimitKind,
    LimitPolicy,
    LimitState,
    Quota,
    QuotaPeriod,
    Window,
)
from keyguard.windows import (
    Bucket,
    Now,
    Tuning,
    current_period,
    decide,
    idle_at,
    inspect,
    policy_from_strings,
    prune,
    release,
)

WALL = datetime(2027, 1, 15, 12, tzinfo=UTC).timestamp()


def at(tick: float, wall: float | None = None) -> Now:
    """A moment: window time ``tick``, wall time ``WALL + tick`` unless given."""
    return Now(tick, WALL + tick if wall is None else wall)


def hit(
    bucket: Bucket, policy: LimitPolicy, t: float, cost: int = 1, lease: str | None = None
) -> tuple[bool, float | None]:
    """One hit on ``bucket`` (charged in place if admitted): allowed, retry_after."""
    admission = decide(bucket, HitRequest("b", policy, cost, lease), at(t))
    return admission.allowed, admission.retry_after


def pruned(bucket: Bucket, now: Now) -> Bucket:
    """A copy of ``bucket`` without what expired by ``now``; ``bucket`` is left alone."""
    twin = bucket.copy()
    prune(twin, now)
    return twin


def by_name(states: tuple[LimitState, ...] | list[LimitState], name: str) -> LimitState:
    return next(s for s in states if s.name == name)


# -- windows ----------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    seconds=st.sampled_from([1, 2, 5, 60, 90, 121]),
    limit=st.integers(1, 6),
    slots=st.integers(1, 60),
    gaps=st.lists(st.integers(0, 2500), min_size=1, max_size=80),
    costs=st.lists(st.integers(0, 4), min_size=80, max_size=80),
)
def test_t70_sliding_window_never_exceeds_limit(
    seconds: int, limit: int, slots: int, gaps: list[int], costs: list[int]
) -> None:
    """Random arrivals and costs: no half-open interval of W seconds admits more than limit."""
    policy = LimitPolicy(
        windows=(Window("w", limit, seconds), Window("long", limit * 3, seconds * 4)),
        quotas=(Quota("daily", 60, QuotaPeriod.DAY),),
    )
    tuning = Tuning(slots=slots)
    bucket, t, admitted = Bucket(), 0, []
    for gap, cost in zip(gaps, costs, strict=False):
        t += gap * seconds  # gaps in thousandths of the window, so every size is exercised
        admission = decide(bucket, HitRequest("b", policy, cost), at(t / 1000), tuning)
        if admission.allowed:
            admitted.append(t)
    for start in admitted:
        assert sum(start <= x < start + seconds * 1000 for x in admitted) <= limit
        assert sum(start <= x < start + seconds * 4000 for x in admitted) <= limit * 3


def test_t69_multi_window_atomicity() -> None:
    """{5/s, 20/min}: 100 requests at t = 0..4 s admit 5 a second; the minute stops at 20."""
    policy = LimitPolicy(windows=(Window("second", 5, 1), Window("minute", 20, 60)))
    bucket = Bucket()
    minute_counts = []
    for second in range(5):
        admitted = 0
        for _ in range(100):
            ok, _ = hit(bucket, policy, second)
            admitted += ok
        assert admitted == (5 if second < 4 else 0)
        minute = by_name(list(inspect(bucket, policy, at(second))), "minute")
        minute_counts.append(minute.limit - minute.remaining)
    assert minute_counts == [5, 10, 15, 20, 20]


def test_window_slides_and_memory_stays_bounded() -> None:
    """Requests leave a window as it slides; a counter never holds more slots than it has."""
    policy = LimitPolicy(windows=(Window("minute", 1000, 60),))
    bucket = Bucket()
    for i in range(6000):
        ok, _ = hit(bucket, policy, i * 0.1)
        assert ok
        assert all(len(c.keys) == len(c.counts) <= 61 for c in bucket.windows.values())
        assert all(c.total == sum(c.counts) for c in bucket.windows.values())
    assert by_name(inspect(bucket, policy, at(660)), "minute").remaining == 1000


def test_oldest_partial_slot_counts_whole() -> None:
    """An hour window (60 s slots) still counts a request made 3,599.5 s ago and 1 s later."""
    policy = LimitPolicy(windows=(Window("hour", 1, 3600),))
    bucket = Bucket()
    ok, _ = hit(bucket, policy, 0.5)
    assert ok
    assert not hit(bucket, policy, 3600.0)[0]
    assert hit(bucket, policy, 3600.0 + 60)[0]  # the slot (0, 60] left at 3660


@settings(max_examples=150, deadline=None)
@given(
    seconds=st.sampled_from([1, 3, 60, 100, 3600]),
    limit=st.integers(1, 5),
    gaps=st.lists(st.integers(0, 900), min_size=1, max_size=40),
)
def test_t72_retry_after_is_truthful(seconds: int, limit: int, gaps: list[int]) -> None:
    """A refused request is admitted exactly retry_after later, and not a millisecond before."""
    policy = LimitPolicy(windows=(Window("w", limit, seconds), Window("z", limit + 2, seconds * 3)))
    bucket, t = Bucket(), 0
    for gap in gaps:
        t += gap * seconds
        admission = decide(bucket, HitRequest("b", policy), at(t / 1000))
        if admission.allowed:
            continue
        retry = admission.retry_after
        assert retry is not None
        assert retry > 0
        assert admission.denied_by is not None
        assert retry >= admission.denied_by.reset_after
        later = decide(bucket.copy(), HitRequest("b", policy), at(t / 1000 + retry))
        assert later.allowed
        sooner = decide(bucket.copy(), HitRequest("b", policy), at(t / 1000 + retry - 0.001))
        assert not sooner.allowed


@settings(max_examples=100, deadline=None)
@given(
    history=st.lists(st.tuples(st.integers(0, 3000), st.integers(0, 5)), max_size=40),
    cost=st.integers(0, 12),
)
def test_t21_refused_request_consumes_nothing(history: list[tuple[int, int]], cost: int) -> None:
    """Whatever came before, a refused hit leaves every window, quota and slot as it was."""
    policy = LimitPolicy(
        windows=(Window("second", 3, 1), Window("minute", 8, 60)),
        quotas=(Quota("daily", 10, QuotaPeriod.DAY), Quota("monthly", 30, QuotaPeriod.MONTH)),
        concurrency=2,
    )
    bucket, t = Bucket(), 0.0
    for n, (gap, units) in enumerate(history):
        t += gap / 1000
        decide(bucket, HitRequest("b", policy, units, f"l{n}"), at(t))
    expected = pruned(bucket, at(t))  # a snapshot, taken before anything reads the bucket
    before = inspect(bucket.copy(), policy, at(t))
    admission = decide(bucket, HitRequest("b", policy, cost, "new"), at(t))
    if not admission.allowed:
        assert bucket == expected
        assert bucket.snapshot() == expected.snapshot()
        assert inspect(bucket, policy, at(t)) == before
        assert admission.states == before
    else:
        assert bucket != expected


def test_t71_cost_above_capacity() -> None:
    """A cost above the quota itself is refused with no retry, and charges nothing."""
    policy = LimitPolicy(
        windows=(Window("minute", 10, 60),), quotas=(Quota("daily", 5, QuotaPeriod.DAY),)
    )
    bucket = Bucket()
    admission = decide(bucket, HitRequest("b", policy, cost=6), at(0))
    assert not admission.allowed
    assert admission.retry_after is None
    assert admission.denied_by is not None
    assert admission.denied_by.name == "daily"
    assert bucket == Bucket()
    assert bucket.is_empty()
    assert not bucket.dirty
    zero = LimitPolicy(windows=(Window("never", 0, 60),))
    refused = decide(bucket, HitRequest("b", zero), at(0))
    assert not refused.allowed
    assert refused.retry_after is None


def test_denied_by_is_the_longest_wait() -> None:
    """When a window and a quota both refuse, the quota (longer wait) is reported."""
    policy = LimitPolicy(
        windows=(Window("minute", 1, 60),), quotas=(Quota("daily", 1, QuotaPeriod.DAY),)
    )
    bucket = Bucket()
    hit(bucket, policy, 0)
    admission = decide(bucket, HitRequest("b", policy), at(1))
    assert admission.denied_by is not None
    assert admission.denied_by.name == "daily"
    assert admission.retry_after == pytest.approx(12 * 3600 - 1)


def test_states_list_every_limit_clamped() -> None:
    """Every window, quota and the cap appear, in order, with remaining and reset >= 0."""
    big = LimitPolicy(
        windows=(Window("minute", 5, 60),),
        quotas=(Quota("daily", 5, QuotaPeriod.DAY), Quota("monthly", 50, QuotaPeriod.MONTH)),
        concurrency=3,
    )
    bucket = Bucket()
    for i in range(5):
        decide(bucket, HitRequest("b", big, 1, f"l{i % 3}"), at(i))
    lowered = LimitPolicy(windows=(Window("minute", 2, 60),), concurrency=1)
    admission = decide(bucket, HitRequest("b", lowered, 1, "x"), at(5))
    assert [(s.name, s.kind) for s in admission.states] == [
        ("minute", LimitKind.WINDOW),
        ("concurrency", LimitKind.CONCURRENCY),
    ]
    assert all(s.remaining == 0 and s.reset_after >= 0 for s in admission.states)
    names = [s.name for s in inspect(bucket, big, at(5))]
    assert names == ["minute", "daily", "monthly", "concurrency"]
    monthly = by_name(inspect(bucket, big, at(5)), "monthly")
    assert monthly.window_seconds == 31 * 86400
    assert monthly.remaining == 45


def test_window_reset_after_counts_the_oldest_slot() -> None:
    """reset_after is when the oldest counted requests leave the window."""
    policy = LimitPolicy(windows=(Window("minute", 5, 60),))
    admission = decide(Bucket(), HitRequest("b", policy), at(10.5))
    assert admission.states[0].reset_after == pytest.approx(60.5)
    assert inspect(Bucket(), policy, at(0))[0].reset_after == 0


def test_windows_of_one_shape_share_a_counter() -> None:
    """Two windows of the same length and scope count each request once."""
    policy = LimitPolicy(windows=(Window("a", 2, 60), Window("b", 3, 60)))
    bucket = Bucket()
    hit(bucket, policy, 0)
    assert [s.remaining for s in inspect(bucket, policy, at(0))] == [1, 2]
    assert len(bucket.windows) == 1


def test_scopes_count_apart() -> None:
    """A service-scoped window does not share a counter with the key's own."""
    policy = LimitPolicy(windows=(Window("minute", 1, 60), Window("svc", 1, 60, "svc:x")))
    bucket = Bucket()
    hit(bucket, policy, 0)
    other = LimitPolicy(windows=(Window("svc", 1, 60, "svc:y"),))
    assert hit(bucket, other, 1)[0]


def test_wall_clock_step_back_folds_into_now() -> None:
    """Requests stamped in the future (clock stepped back) count now and expire one window on."""
    policy = LimitPolicy(windows=(Window("minute", 2, 60),))
    bucket = Bucket()
    for _ in range(2):
        hit(bucket, policy, 7200)
    ok, _ = hit(bucket, policy, 3600)
    assert not ok
    assert bucket.dirty  # the fold is a change a store must keep, though nothing was charged
    assert not hit(bucket, policy, 3659)[0]
    assert hit(bucket, policy, 3661)[0]


# -- quotas -------------------------------------------------------------------------


def test_quota_counts_units_and_resets_at_utc_midnight() -> None:
    """A daily quota counts cost units and starts over at 00:00 UTC."""
    policy = LimitPolicy(quotas=(Quota("daily", 10, QuotaPeriod.DAY),))
    midnight = datetime(2027, 1, 16, tzinfo=UTC).timestamp()
    bucket = Bucket()
    admission = decide(bucket, HitRequest("b", policy, 7), Now(0, midnight - 60))
    assert admission.states[0].remaining == 3
    assert admission.states[0].reset_after == 60
    refused = decide(bucket, HitRequest("b", policy, 4), Now(1, midnight - 0.001))
    assert not refused.allowed
    assert refused.retry_after == pytest.approx(0.001)
    assert decide(bucket, HitRequest("b", policy, 10), Now(2, midnight)).allowed
    assert [u.used for u in bucket.quotas.values()] == [10]


def test_quota_month_period() -> None:
    """Monthly ids are YYYY-MM of the UTC date; December rolls into January."""
    dec = datetime(2027, 12, 31, 23, 59, tzinfo=UTC).timestamp()
    period, start, end = current_period(dec, QuotaPeriod.MONTH)
    assert period == "2027-12"
    assert end == datetime(2028, 1, 1, tzinfo=UTC).timestamp()
    assert end - start == 31 * 86400
    assert current_period(dec, QuotaPeriod.DAY)[0] == "2027-12-31"


@settings(max_examples=200, deadline=None)
@given(walls=st.lists(st.floats(0, 4_102_444_800, allow_nan=False), min_size=1, max_size=20))
def test_cached_period_matches_the_calendar(walls: list[float]) -> None:
    """The remembered current period is always the one the UTC calendar gives, in any order
    (the exact calendar: datetime rounds 0.5 us before midnight into the next day)."""
    for wall in walls:
        day = datetime.fromtimestamp(math.floor(wall), UTC).date()
        for kind, text in ((QuotaPeriod.DAY, day.isoformat()), (QuotaPeriod.MONTH, str(day)[:7])):
            period, start, end = current_period(wall, kind)
            assert period == text
            assert start <= wall < end


# -- concurrency --------------------------------------------------------------------


def test_t85_double_or_stray_release() -> None:
    """Releasing twice or releasing an unknown lease changes nothing; counts stay >= 0."""
    policy = LimitPolicy(concurrency=2)
    bucket = Bucket()
    hit(bucket, policy, 0, lease="a")
    assert release(bucket, "a")
    assert not release(bucket, "a")
    assert not release(bucket, "ghost")
    assert inspect(bucket, policy, at(0))[0].remaining == 2
    assert bucket == Bucket()
    assert bucket.is_empty()


def test_t84_crash_while_holding_slots() -> None:
    """Leases never released come back after the TTL."""
    policy = LimitPolicy(concurrency=2)
    tuning = Tuning(lease_ttl=30)
    bucket = Bucket()
    for lease in ("a", "b"):
        decide(bucket, HitRequest("b", policy, lease=lease), at(0), tuning)
    refused = decide(bucket, HitRequest("b", policy, lease="c"), at(29.9), tuning)
    assert not refused.allowed
    assert refused.retry_after == pytest.approx(0.1)
    assert decide(bucket, HitRequest("b", policy, lease="c"), at(30), tuning).allowed
    assert list(bucket.leases) == ["c"]


def test_same_lease_twice_takes_one_slot() -> None:
    """Hitting again with a lease already held refreshes it instead of taking a second slot."""
    policy = LimitPolicy(concurrency=1)
    bucket = Bucket()
    hit(bucket, policy, 0, lease="a")
    ok, _ = hit(bucket, policy, 1, lease="a")
    assert ok
    assert len(bucket.leases) == 1


def test_hit_validation() -> None:
    """Negative costs, caps without leases and sub-second windows are programming errors."""
    with pytest.raises(ValueError, match="cost"):
        decide(Bucket(), HitRequest("b", LimitPolicy(), cost=-1), at(0))
    with pytest.raises(ValueError, match="cost"):
        decide(Bucket(), HitRequest("b", LimitPolicy(), cost=True), at(0))
    with pytest.raises(ValueError, match="lease"):
        decide(Bucket(), HitRequest("b", LimitPolicy(concurrency=1)), at(0))
    with pytest.raises(ValueError, match="second"):
        decide(Bucket(), HitRequest("b", LimitPolicy(windows=(Window("w", 1, 0),))), at(0))
    with pytest.raises(ConfigurationError):
        Tuning(slots=0)
    with pytest.raises(ConfigurationError):
        Tuning(lease_ttl=0)


# -- expiry and storage form --------------------------------------------------------


def test_idle_at_is_when_everything_expired() -> None:
    """idle_at covers the last window slot, the latest lease and the quota period."""
    policy = LimitPolicy(windows=(Window("minute", 5, 60),), concurrency=1)
    bucket = Bucket()
    hit(bucket, policy, 10.5, lease="a")
    when = idle_at(bucket, at(10.5))
    assert when == pytest.approx(10.5 + 120)
    assert bucket.idle == round(when * 1000)  # kept up to date by each charge
    assert not pruned(bucket, at(when - 0.001)).is_empty()
    assert pruned(bucket, at(when)).is_empty()
    quota = LimitPolicy(quotas=(Quota("daily", 5, QuotaPeriod.DAY),))
    bucket = Bucket()
    hit(bucket, quota, 0)
    assert idle_at(bucket, at(0)) == pytest.approx(12 * 3600)
    assert bucket.idle == 12 * 3600 * 1000


# -- policy strings -----------------------------------------------------------------


def test_policy_from_strings() -> None:
    """A limits string becomes named windows; quotas and the cap follow."""
    policy = policy_from_strings(
        "60/minute;1000/hour;10000/day; 5 per 10 seconds", 500, 9000, 4, scope="svc:img"
    )
    assert policy.windows == (
        Window("minute", 60, 60, "svc:img"),
        Window("hour", 1000, 3600, "svc:img"),
        Window("day", 10000, 86400, "svc:img"),
        Window("10-second", 5, 10, "svc:img"),
    )
    assert policy.quotas == (
        Quota("daily", 500, QuotaPeriod.DAY, "svc:img"),
        Quota("monthly", 9000, QuotaPeriod.MONTH, "svc:img"),
    )
    assert policy.concurrency == 4
    assert policy_from_strings(None, None, None, None).is_empty()
    assert policy_from_strings("  ", None, None, None).is_empty()


@pytest.mark.parametrize(
    ("rate", "daily", "monthly", "cap"),
    [
        ("sixty a minute", None, None, None),
        ("0/minute", None, None, None),
        ("10/minute;20/minute", None, None, None),
        (None, 0, None, None),
        (None, None, True, None),
        (None, None, None, -1),
    ],
)
def test_policy_from_strings_refuses(
    rate: str | None, daily: int | None, monthly: int | None, cap: int | None
) -> None:
    """Every bad setting is a ConfigurationError at start-up."""
    with pytest.raises(ConfigurationError):
        policy_from_strings(rate, daily, monthly, cap)


# -- the mutable state --------------------------------------------------------------


def test_refusal_leaves_an_unexpired_bucket_clean() -> None:
    """A refusal that drops nothing leaves ``dirty`` unset, so a store writes nothing back."""
    policy = LimitPolicy(windows=(Window("minute", 1, 60),), concurrency=1)
    bucket = Bucket()
    assert hit(bucket, policy, 0, lease="a")[0]
    assert bucket.dirty
    bucket.dirty = False
    snapshot = bucket.copy()
    assert not hit(bucket, policy, 1, lease="b")[0]
    assert not bucket.dirty
    assert bucket == snapshot
    inspect(bucket, policy, at(2))
    assert not bucket.dirty
    inspect(bucket, policy, at(61))  # the minute's only slot has left the window
    assert bucket.dirty


def test_copy_is_independent() -> None:
    """A copy counts apart from its original."""
    policy = LimitPolicy(
        windows=(Window("minute", 5, 60),), quotas=(Quota("daily", 5, QuotaPeriod.DAY),)
    )
    bucket = Bucket()
    hit(bucket, policy, 0)
    twin = bucket.copy()
    hit(twin, policy, 1)
    assert [s.remaining for s in inspect(bucket, policy, at(1))] == [4, 4]
    assert [s.remaining for s in inspect(twin, policy, at(1))] == [3, 3]
    assert bucket != twin


def test_equal_policies_and_many_policies_answer_alike() -> None:
    """Policies are compiled once each; equal ones, and more than the cache holds, agree."""
    bucket = Bucket()
    for n in range(1500):
        policy = LimitPolicy(windows=(Window("minute", 2000, 60),), concurrency=n + 1)
        assert hit(bucket, policy, 0, lease=f"l{n}")[0]
    same = [LimitPolicy(windows=(Window("minute", 2000, 60),)) for _ in range(2)]
    assert inspect(bucket, same[0], at(0)) == inspect(bucket, same[1], at(0))
    assert inspect(bucket, same[0], at(0))[0].remaining == 500
