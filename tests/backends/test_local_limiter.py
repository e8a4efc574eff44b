"""The SQLite default's limiter: windows and slots in memory, quotas in the file.

The contract suite (``test_ratestore_contract.py``, kind ``local``) covers what every
store does; these tests cover what the split adds: which store each request reaches,
the refund of a window refusal, what a restart keeps, and how the guard runs it.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from keyguard.backends.local_limiter import LocalWindowsRateStore, quota_charges
from keyguard.backends.memory import MemoryKeyStore
from keyguard.backends.memory_limiter import MemoryRateStore
from keyguard.backends.sqlite import SQLiteKeyStore
from keyguard.backends.sqlite_limiter import SQLiteRateStore
from keyguard.errors import StorageError
from keyguard.guard import Guard
from keyguard.limiting import (
    Adjustment,
    Admission,
    HitRequest,
    LimitKind,
    LimitPolicy,
    LimitState,
    Quota,
    QuotaAdjuster,
    QuotaCharge,
    QuotaPeriod,
    RateBackend,
    Window,
)
from keyguard.testing import FakeClock

START = datetime(2027, 1, 15, 12, tzinfo=UTC)
DAILY = Quota("daily", 10, QuotaPeriod.DAY)
MONTHLY = Quota("monthly", 100, QuotaPeriod.MONTH)
SERVICE = Quota("svc-daily", 50, QuotaPeriod.DAY, "svc:chat")
MINUTE = Window("minute", 2, 60)


@dataclass
class Rig:
    store: LocalWindowsRateStore
    clock: FakeClock
    path: Path

    def reopen(self) -> LocalWindowsRateStore:
        """A new store over the same file, as after a restart."""
        self.store.close()
        self.store = open_local(self.path, self.clock)
        return self.store


def open_local(path: Path, clock: FakeClock) -> LocalWindowsRateStore:
    return LocalWindowsRateStore(MemoryRateStore(clock=clock), SQLiteRateStore(path, clock=clock))


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    clock = FakeClock(START)
    path = tmp_path / "kg.db"
    rig = Rig(open_local(path, clock), clock, path)
    yield rig
    rig.store.close()


def used(states: tuple[LimitState, ...] | list[LimitState], name: str) -> int:
    state = next(s for s in states if s.name == name)
    return state.limit - state.remaining


def rows(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        count: int = conn.execute("SELECT count(*) FROM rl_buckets").fetchone()[0]
    return count


def done_without_suspending(coro: Coroutine[Any, Any, Any]) -> object:
    """Run ``coro`` one step: it must finish then, never waiting on a thread or I/O."""
    with pytest.raises(StopIteration) as finished:
        coro.send(None)
    return finished.value.value


def test_one_object_is_every_capability(rig: Rig) -> None:
    """The store is a full rate backend that settles quotas, and says what it holds."""
    assert isinstance(rig.store, RateBackend)
    assert isinstance(rig.store, QuotaAdjuster)
    assert "MemoryRateStore" in repr(rig.store)
    assert "SQLiteRateStore" in repr(rig.store)


def test_a_policy_without_quotas_never_touches_the_file(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Windows and slots alone are counted in memory: no quota store call, no row."""

    def no_file(*args: object) -> None:
        raise AssertionError("the file was reached")

    for name in ("hit", "ahit", "peek", "apeek", "release", "arelease"):
        monkeypatch.setattr(rig.store.quotas, name, no_file)
    policy = LimitPolicy(windows=(MINUTE,), concurrency=1)
    assert rig.store.hit(HitRequest("k", policy, lease="a")).allowed
    assert not rig.store.hit(HitRequest("k", policy, lease="b")).allowed
    rig.store.release("k", "a")
    assert used(list(rig.store.peek("k", policy)), "minute") == 1
    monkeypatch.undo()
    assert rows(rig.path) == 0


def test_the_async_face_of_memory_work_never_suspends(rig: Rig) -> None:
    """A hit without quotas, a peek and a release finish in one step on the event loop."""
    policy = LimitPolicy(windows=(MINUTE,), concurrency=1)
    admission = done_without_suspending(rig.store.ahit(HitRequest("k", policy, lease="a")))
    assert isinstance(admission, Admission)
    assert admission.allowed
    states = done_without_suspending(rig.store.apeek("k", policy))
    assert isinstance(states, tuple)
    assert [s.remaining for s in states] == [1, 0]
    done_without_suspending(rig.store.arelease("k", "a"))
    assert [s.remaining for s in rig.store.peek("k", policy)] == [1, 1]


def test_a_quota_refusal_takes_no_window_nor_slot(rig: Rig) -> None:
    """A request the quota refuses leaves the windows and slots untouched."""
    policy = LimitPolicy(windows=(MINUTE,), quotas=(DAILY,), concurrency=1)
    refused = rig.store.hit(HitRequest("k", policy, cost=11, lease="a"))
    assert not refused.allowed
    assert refused.denied_by is not None
    assert refused.denied_by.name == "daily"
    assert refused.retry_after is None  # a cost above the quota itself
    assert [(s.name, s.remaining) for s in refused.states] == [
        ("minute", 2),
        ("daily", 10),
        ("concurrency", 1),
    ]
    assert rig.store.hit(HitRequest("k", policy, cost=10, lease="b")).allowed


def test_a_window_refusal_gives_back_exactly_the_units_it_charged(rig: Rig) -> None:
    """Every quota counter charged (key and service, day and month) gets its units back."""
    policy = LimitPolicy(windows=(MINUTE,), quotas=(DAILY, MONTHLY, SERVICE))
    for _ in range(2):
        assert rig.store.hit(HitRequest("k", policy, cost=3)).allowed
    before = list(rig.store.peek("k", policy))
    refused = rig.store.hit(HitRequest("k", policy, cost=3))
    assert not refused.allowed
    assert refused.denied_by is not None
    assert refused.denied_by.name == "minute"
    assert refused.retry_after is not None
    # The refusal reports the quotas as they stand (refunded), as a peek does.
    assert list(refused.states) == before
    assert list(rig.store.peek("k", policy)) == before
    assert [used(before, n) for n in ("daily", "monthly", "svc-daily")] == [6, 6, 6]


def test_a_concurrency_refusal_gives_the_units_back_too(rig: Rig) -> None:
    """The cap refuses after the quota charged: the units come back, the slot holder keeps its."""
    policy = LimitPolicy(quotas=(DAILY,), concurrency=1)
    assert rig.store.hit(HitRequest("k", policy, cost=4, lease="a")).allowed
    refused = rig.store.hit(HitRequest("k", policy, cost=4, lease="b"))
    assert refused.denied_by is not None
    assert refused.denied_by.kind is LimitKind.CONCURRENCY
    assert used(list(rig.store.peek("k", policy)), "daily") == 4


def test_a_quota_refusal_waits_for_the_slowest_refusing_limit(rig: Rig) -> None:
    """Ten seconds before midnight a spent quota frees first: a full hour window decides."""
    hour = Window("hour", 1, 3600)
    policy = LimitPolicy(windows=(hour,), quotas=(Quota("daily", 1, QuotaPeriod.DAY),))
    single = MemoryRateStore(clock=rig.clock)  # one store, one step: the answer to match
    rig.clock.advance(12 * 3600 - 10)  # 23:59:50 UTC
    for store in (rig.store, single):
        assert store.hit(HitRequest("k", policy)).allowed
    refused, expected = (s.hit(HitRequest("k", policy)) for s in (rig.store, single))
    assert refused.denied_by is not None
    assert refused.denied_by.name == "hour"
    assert refused == expected
    assert refused.retry_after is not None
    assert refused.retry_after > 3600


def test_a_refund_that_fails_is_logged_and_still_refuses(
    rig: Rig, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A refund the file cannot take leaves the units charged (under-admits), never admits."""
    policy = LimitPolicy(windows=(Window("minute", 1, 60),), quotas=(DAILY,))
    assert rig.store.hit(HitRequest("secret-bucket", policy, cost=2)).allowed

    def broken(adjustment: Adjustment) -> None:
        raise StorageError("the SQLite rate store could not adjust a quota")

    monkeypatch.setattr(rig.store.quotas, "adjust", broken)
    with caplog.at_level(logging.WARNING, logger="keyguard"):
        refused = rig.store.hit(HitRequest("secret-bucket", policy, cost=2))
    assert not refused.allowed
    assert refused.denied_by is not None
    assert refused.denied_by.name == "minute"
    assert "could not give back quota units: StorageError" in caplog.text
    assert "secret-bucket" not in caplog.text
    monkeypatch.undo()
    assert used(list(rig.store.peek("secret-bucket", policy)), "daily") == 4


def test_an_error_in_the_window_step_gives_the_units_back(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever the memory step raises, the quota units it followed are given back."""
    policy = LimitPolicy(windows=(MINUTE,), quotas=(DAILY,))

    def broken(request: HitRequest) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(rig.store, "_hit_windows", broken)
    with pytest.raises(RuntimeError):
        rig.store.hit(HitRequest("k", policy, cost=5))
    with pytest.raises(RuntimeError):
        asyncio.run(rig.store.ahit(HitRequest("k", policy, cost=5)))
    assert used(list(rig.store.peek("k", policy)), "daily") == 0


def test_bad_requests_are_refused_before_anything_is_charged(rig: Rig) -> None:
    """A cap without a lease, or a window under a second, charges no quota."""
    capped = LimitPolicy(quotas=(DAILY,), concurrency=1)
    with pytest.raises(ValueError, match="lease"):
        rig.store.hit(HitRequest("k", capped, cost=5))
    short = LimitPolicy(windows=(Window("instant", 1, 0),), quotas=(DAILY,))
    with pytest.raises(ValueError, match="second"):
        rig.store.hit(HitRequest("k", short, cost=5))
    assert used(list(rig.store.peek("k", LimitPolicy(quotas=(DAILY,)))), "daily") == 0


def test_a_restart_keeps_quotas_and_forgets_windows(rig: Rig) -> None:
    """A new store over the same file sees the month's units, and fresh windows and slots."""
    policy = LimitPolicy(windows=(MINUTE,), quotas=(DAILY, MONTHLY), concurrency=1)
    assert rig.store.hit(HitRequest("k", policy, cost=3, lease="a")).allowed
    assert rig.store.hit(HitRequest("other", policy, cost=1, lease="a")).allowed
    store = rig.reopen()
    states = list(store.peek("k", policy))
    assert [used(states, n) for n in ("minute", "daily", "monthly", "concurrency")] == [0, 3, 3, 0]
    assert store.hit(HitRequest("k", policy, cost=7, lease="b")).allowed
    assert not store.hit(HitRequest("k", policy, cost=1, lease="c")).allowed  # daily is spent


def test_reset_and_adjust_reach_both_stores(rig: Rig) -> None:
    """Settling moves the file's quota counters; reset clears memory and file alike."""
    policy = LimitPolicy(windows=(Window("minute", 1, 60),), quotas=(DAILY,))
    assert rig.store.hit(HitRequest("k", policy, cost=6)).allowed
    charge = QuotaCharge(QuotaPeriod.DAY, "", "2027-01-15")
    rig.store.adjust(Adjustment("k", (charge,), -4))
    asyncio.run(rig.store.aadjust(Adjustment("k", (charge,), 1)))
    assert [used(list(rig.store.peek("k", policy)), n) for n in ("minute", "daily")] == [1, 3]
    asyncio.run(rig.store.areset("k"))
    assert [used(list(rig.store.peek("k", policy)), n) for n in ("minute", "daily")] == [0, 0]


def test_quota_charges_name_the_period_each_quota_charged(rig: Rig) -> None:
    """Read a moment after the hit, or just past midnight, the charged periods are the hit's."""
    policy = LimitPolicy(quotas=(DAILY, MONTHLY, SERVICE))
    rig.clock.advance(12 * 3600 - 1)  # 23:59:59 UTC, January 15th
    admission = rig.store.hit(HitRequest("k", policy, cost=1))
    later = rig.clock.now() + 2  # 00:00:01 on the 16th
    assert quota_charges(policy, admission.states, later) == (
        QuotaCharge(QuotaPeriod.DAY, "", "2027-01-15"),
        QuotaCharge(QuotaPeriod.MONTH, "", "2027-01"),
        QuotaCharge(QuotaPeriod.DAY, "svc:chat", "2027-01-15"),
    )


def test_the_guard_runs_it_in_one_thread_hop_with_quick_releases(tmp_path: Path) -> None:
    """Behind SQLite keys the guard checks in one worker thread; releases never wait."""
    store = open_local(tmp_path / "kg.db", FakeClock(START))
    keys = SQLiteKeyStore(tmp_path / "kg.db")
    try:
        guard = Guard(keys=keys, limiter=store, auth_failures=0)
        assert (guard.inline, guard.threaded, guard.quick_release) == (False, True, True)
        alone = Guard(keys=MemoryKeyStore(), limiter=store, auth_failures=0)
        assert not alone.inline  # a quota hit waits on the file: never on the event loop
    finally:
        keys.close()
        store.close()


# -- a property: the split never over-admits, and gives back exactly ---------------------

hits = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=6),  # cost
        st.sampled_from([0.0, 0.5, 7.0]),  # seconds before it
        st.booleans(),  # release the slot afterwards
    ),
    max_size=40,
)


@hypothesis_settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(hits)
def test_admissions_and_units_stay_within_every_limit(
    tmp_path_factory: pytest.TempPathFactory, sequence: list[tuple[int, float, bool]]
) -> None:
    """Under any costs, pauses and releases: no 10 s holds more than the window's limit,
    slots never exceed the cap, and the quota spent is exactly the admitted units."""
    clock = FakeClock(START)
    store = open_local(tmp_path_factory.mktemp("prop") / "kg.db", clock)
    window, quota = Window("10-second", 3, 10), Quota("daily", 20, QuotaPeriod.DAY)
    policy = LimitPolicy(windows=(window,), quotas=(quota,), concurrency=2)
    admitted: list[float] = []
    held: list[str] = []
    units = 0
    try:
        for n, (cost, pause, release) in enumerate(sequence):
            clock.advance(pause)
            admission = store.hit(HitRequest("k", policy, cost=cost, lease=f"r{n}"))
            if admission.allowed:
                admitted.append(clock.now())
                held.append(f"r{n}")
                units += cost
            now = clock.now()
            assert sum(1 for t in admitted if t > now - window.seconds) <= window.limit
            assert len(held) <= 2
            if release and held:
                store.release("k", held.pop(0))
            assert used(list(store.peek("k", policy)), "daily") == units <= quota.limit
    finally:
        store.close()
