"""The usage rules, one by one, driven by event times from a FakeClock."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from keyguard.alerts import AlertKind, BurstRule, ErrorRateRule, NewIPRule
from keyguard.alerts.bounded import Bounded
from keyguard.alerts.rules import BurstWatch, ErrorRateWatch, NewIPWatch, QuotaWatch
from keyguard.limiting import LimitKind, LimitState
from keyguard.testing import FakeClock

from .conftest import DAY, event, quota

T = FakeClock().now()  # 2027-01-15T08:00:00Z
THRESHOLDS = (0.8, 1.0)


def test_quota_fires_each_threshold_once_per_period() -> None:
    """80 % fires once, 100 % once, nothing more that day; the next day starts afresh."""
    watch = QuotaWatch(100)
    fired = []
    for used in (50, 79, 80, 81, 90, 99, 100, 100):
        fired += watch.observe(event(T + used, limits=(quota(T + used, 100, used),)), THRESHOLDS)
    assert [a.details["threshold"] for a in fired] == [0.8, 1.0]
    first = fired[0]
    assert (first.kind, first.key_id, first.owner) == (AlertKind.QUOTA, "key_1", "alice")
    assert first.details == {
        "quota": "daily",
        "period": "day",
        "threshold": 0.8,
        "used": 80,
        "limit": 100,
        "share": 0.8,
        "resets_at": "2027-01-16T00:00:00Z",
    }
    tomorrow = T + DAY
    again = watch.observe(event(tomorrow, limits=(quota(tomorrow, 100, 85),)), THRESHOLDS)
    assert [a.details["threshold"] for a in again] == [0.8]


def test_quota_jump_sends_only_the_highest_and_old_periods_are_ignored() -> None:
    """A jump past both thresholds sends 100 % only; a late event of the previous
    period fires nothing."""
    watch = QuotaWatch(100)
    today = watch.observe(event(T, limits=(quota(T, 10, 10),)), THRESHOLDS)
    assert [a.details["threshold"] for a in today] == [1.0]
    late = T - DAY
    assert watch.observe(event(late, limits=(quota(late, 10, 9),)), THRESHOLDS) == []


def test_quota_monthly_and_daily_are_separate() -> None:
    """A monthly quota is its own counter, reported with period 'month'."""
    watch = QuotaWatch(100)
    limits = (quota(T, 100, 85), quota(T, 1000, 900, monthly=True))
    fired = watch.observe(event(T, limits=limits), THRESHOLDS)
    assert [(a.details["period"], a.details["resets_at"]) for a in fired] == [
        ("day", "2027-01-16T00:00:00Z"),
        ("month", "2027-02-01T00:00:00Z"),
    ]


def test_quota_ignores_windows_and_empty_limits() -> None:
    """Rate windows and zero-limit quotas never fire a quota alert."""
    watch = QuotaWatch(100)
    window = LimitState("minute", LimitKind.WINDOW, 10, 0, 30.0, 60)
    zero = LimitState("daily", LimitKind.QUOTA, 0, 0, 100.0, DAY)
    assert watch.observe(event(T, limits=(window, zero)), THRESHOLDS) == []
    watch.forget("key_1")


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 3), st.integers(0, DAY - 1), st.integers(0, 100)),
        max_size=60,
    )
)
def test_quota_never_fires_a_threshold_twice_in_a_period(
    steps: list[tuple[int, int, int]],
) -> None:
    """Whatever the order and values of events, each (period, threshold) fires once."""
    watch = QuotaWatch(100)
    seen: set[tuple[object, object]] = set()
    for day, second, used in steps:
        at = T - T % DAY + day * DAY + second
        for alert in watch.observe(event(at, limits=(quota(at, 100, used),)), (0.5, 0.8, 1.0)):
            slot = (alert.details["resets_at"], alert.details["threshold"])
            assert slot not in seen
            seen.add(slot)
            assert float(alert.details["share"]) >= float(alert.details["threshold"])  # type: ignore[arg-type]


def test_error_rate_needs_volume_and_share_then_cools_down() -> None:
    """A spike fires once past min_requests and the share, then not during cool-down;
    old failures leave the window."""
    watch = ErrorRateWatch(100)
    rule = ErrorRateRule(share=0.5, window=60, min_requests=10, cooldown=600)
    fired = []
    for i in range(9):
        fired += watch.observe(event(T + i, status=500), rule)
    assert fired == []  # nine failures: not enough requests yet
    fired += watch.observe(event(T + 9, status=429, reason="rate_limit_exceeded"), rule)
    assert len(fired) == 1
    assert fired[0].details == {
        "window_seconds": 60,
        "requests": 10,
        "errors": 10,
        "share": 1.0,
        "threshold": 0.5,
    }
    for i in range(20):
        fired += watch.observe(event(T + 10 + i, status=503), rule)
    assert len(fired) == 1  # cooling down
    later = T + 700  # the old failures have left the window
    assert watch.observe(event(later, status=500), rule) == []
    for i in range(1, 10):
        fired += watch.observe(event(later + i, status=200 if i % 3 else 500), rule)
    assert len(fired) == 1  # 4 failures out of 10: under half
    watch.forget("key_1")


def test_error_rate_ignores_successes_and_restarts_on_new_window() -> None:
    """Successes never fire; an owner's new window size restarts the count."""
    watch = ErrorRateWatch(100)
    rule = ErrorRateRule(share=0.1, window=60, min_requests=1, cooldown=0)
    assert watch.observe(event(T), rule) == []
    assert len(watch.observe(event(T, status=500), rule)) == 1
    wider = ErrorRateRule(share=0.9, window=120, min_requests=2, cooldown=0)
    assert watch.observe(event(T - 5, status=500), wider) == []  # fresh state, one request
    assert len(watch.observe(event(T - 10, status=500), wider)) == 1  # late: newest bucket


def test_new_ip_learns_the_first_address_then_reports_new_ones() -> None:
    """The first address is learnt silently; a new one fires with the IP; known ones don't."""
    watch = NewIPWatch(100, 4, 64)
    rule = NewIPRule(cooldown=0)
    assert watch.observe(event(T, client_ip="203.0.113.7"), rule) == []
    assert watch.observe(event(T + 1, client_ip="203.0.113.7"), rule) == []
    assert watch.observe(event(T + 1, client_ip=None), rule) == []
    [alert] = watch.observe(event(T + 2, client_ip="198.51.100.9"), rule)
    assert alert.kind is AlertKind.NEW_IP
    assert alert.details == {"client_ip": "198.51.100.9", "known_addresses": 1}
    other_key = event(T + 2, key_id="key_2", client_ip="198.51.100.9")
    assert watch.observe(other_key, rule) == []  # per key


def test_new_ip_compares_ipv6_by_prefix_and_maps_ipv4() -> None:
    """Addresses in one /64 count as one; an IPv4-mapped address is its IPv4."""
    watch = NewIPWatch(100, 4, 64)
    rule = NewIPRule(cooldown=0)
    watch.observe(event(T, client_ip="2001:db8:1:2::1"), rule)
    assert watch.observe(event(T, client_ip="2001:db8:1:2:ffff::9"), rule) == []
    assert len(watch.observe(event(T, client_ip="2001:db8:1:3::1"), rule)) == 1
    watch.observe(event(T, key_id="k4", client_ip="192.0.2.1"), rule)
    assert watch.observe(event(T, key_id="k4", client_ip="::ffff:192.0.2.1"), rule) == []
    assert len(watch.observe(event(T, key_id="k4", client_ip="not-an-ip"), rule)) == 1


def test_new_ip_cooldown_and_memory_bound() -> None:
    """During the cool-down new addresses are not learnt (so they are reported after
    it); each key remembers at most ips_per_key addresses."""
    watch = NewIPWatch(100, 2, 64)
    rule = NewIPRule(cooldown=60)
    watch.observe(event(T, client_ip="192.0.2.1"), rule)
    assert len(watch.observe(event(T + 1, client_ip="192.0.2.2"), rule)) == 1
    assert watch.observe(event(T + 2, client_ip="192.0.2.3"), rule) == []  # muted
    assert len(watch.observe(event(T + 70, client_ip="192.0.2.3"), rule)) == 1  # reported now
    # only two addresses are kept: the first one was forgotten
    assert len(watch.observe(event(T + 140, client_ip="192.0.2.1"), rule)) == 1
    watch.forget("key_1")
    assert watch.observe(event(T + 200, client_ip="192.0.2.9"), rule) == []  # relearnt


def test_bounded_forgets_least_recently_used() -> None:
    """The per-key maps keep at most cap entries, evicting the least recently used."""
    keys: Bounded[str, int] = Bounded(2)
    keys.put("a", 1)
    keys.put("b", 2)
    assert keys.get("a") == 1
    keys.put("c", 3)
    assert ("a" in keys, "b" in keys, len(keys)) == (True, False, 2)
    keys.pop("zzz")


def steady(watch: BurstWatch, rule: BurstRule, start: float, minutes: int, per_minute: int) -> int:
    """Feed ``per_minute`` evenly spread requests for ``minutes``; alerts fired."""
    fired = 0
    for i in range(minutes * per_minute):
        fired += len(watch.observe(event(start + i * 60 / per_minute), rule))
    return fired


def test_burst_fires_far_above_the_usual_rate_after_warmup() -> None:
    """A steady key never fires; ten times its rate (and the floor) fires once."""
    watch = BurstWatch(100)
    rule = BurstRule(factor=5, floor=50, average=600, warmup=600, cooldown=300)
    assert steady(watch, rule, T, 30, 20) == 0
    start = T + 30 * 60
    fired = [a for i in range(200) for a in watch.observe(event(start + i * 0.25), rule)]
    assert len(fired) == 1
    details = fired[0].details
    assert fired[0].kind is AlertKind.BURST
    assert int(details["requests_last_minute"]) > 5 * float(details["usual_per_minute"])  # type: ignore[arg-type]
    assert int(details["requests_last_minute"]) >= 50  # type: ignore[arg-type]


def test_burst_waits_for_warmup_and_respects_the_floor() -> None:
    """A new key's first busy minute is not a burst; nor is a jump below the floor."""
    watch = BurstWatch(100)
    rule = BurstRule(factor=2, floor=100, average=600, warmup=600, cooldown=0)
    assert steady(watch, rule, T, 2, 300) == 0  # within warm-up
    quiet = BurstWatch(100)
    assert steady(quiet, rule, T, 20, 1) == 0
    assert steady(quiet, rule, T + 20 * 60, 1, 60) == 0  # 60x the rate, under the floor


def test_burst_average_decays_over_idle_time() -> None:
    """After a long quiet spell the usual rate decays, so a return to the old busy
    rate counts as a burst (above the floor)."""
    watch = BurstWatch(100)
    rule = BurstRule(factor=3, floor=100, average=600, warmup=600, cooldown=0)
    assert steady(watch, rule, T, 30, 120) == 0
    assert steady(watch, rule, T + 10 * DAY, 1, 120) >= 1
    watch.forget("key_1")
