"""One contract for every rate store, through its sync face and through its async face.

The ``limits``-storage adapter keeps windows on the storage's own (real) clock, so tests
that move a FakeClock to slide a window skip it. ``local`` is the store of the SQLite
default: windows and slots in memory, quotas in a SQLite file. Redis runs on a
throwaway server and a three-master Cluster (``tests/redis_support.py``); its store
is given the FakeClock, whose time the script then takes instead of the server's TIME
(production never passes a clock), and a fresh key prefix per test instead of a flush.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Coroutine, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pytest
from limits.storage import MemoryStorage

from keyguard.backends.limits_storage import LimitsRateStore
from keyguard.backends.local_limiter import LocalWindowsRateStore
from keyguard.backends.memory_limiter import MemoryRateStore
from keyguard.backends.redis_limiter import RedisRateStore
from keyguard.backends.sqlite_limiter import SQLiteRateStore
from keyguard.errors import ConfigurationError, StorageError
from keyguard.limiting import (
    Adjustment,
    Admission,
    AsyncRateStore,
    HitRequest,
    LimitKind,
    LimitPolicy,
    LimitState,
    Quota,
    QuotaAdjuster,
    QuotaCharge,
    QuotaPeriod,
    RateStore,
    Window,
)
from keyguard.testing import FakeClock
from tests.backends.test_redis_limiter import redis_cluster  # noqa: F401 - ports kept valid
from tests.redis_support import RedisCluster, RedisServer, redis_server  # noqa: F401

T = TypeVar("T")
START = datetime(2027, 1, 15, 12, tzinfo=UTC)
LEASE_TTL = 30.0
_PREFIXES = itertools.count()
# Generous for a loaded test machine: 200 simultaneous hits queue for a connection. A
# Cluster's pools do not queue, so they get room for all of them.
REDIS_TEST_OPTIONS: dict[str, Any] = {
    "socket_timeout": 10,
    "socket_connect_timeout": 10,
    "pool_timeout": 30,
    "max_connections": 16,
}


class Backend(RateStore, AsyncRateStore, QuotaAdjuster, Protocol):
    """A store with both faces, as every backend here is, that can settle quotas."""


class Face(Protocol):
    """What a test drives: the store's sync face, or its async face run to completion."""

    def hit(self, request: HitRequest) -> Admission: ...
    def release(self, bucket: str, lease: str) -> None: ...
    def peek(self, bucket: str, policy: LimitPolicy) -> Sequence[LimitState]: ...
    def reset(self, bucket: str) -> None: ...
    def adjust(self, adjustment: Adjustment) -> None: ...
    def hit_many(self, requests: Sequence[HitRequest]) -> list[Admission]: ...
    def adjust_many(self, adjustments: Sequence[Adjustment]) -> None: ...


class SyncFace:
    """The sync methods, with concurrent hits on threads released by one barrier."""

    def __init__(self, store: Backend) -> None:
        self._store = store
        self.hit, self.release = store.hit, store.release
        self.peek, self.reset, self.adjust = store.peek, store.reset, store.adjust

    def hit_many(self, requests: Sequence[HitRequest]) -> list[Admission]:
        barrier = threading.Barrier(len(requests))

        def one(request: HitRequest) -> Admission:
            barrier.wait()
            return self._store.hit(request)

        with ThreadPoolExecutor(max_workers=len(requests)) as pool:
            return list(pool.map(one, requests))

    def adjust_many(self, adjustments: Sequence[Adjustment]) -> None:
        barrier = threading.Barrier(len(adjustments))

        def one(adjustment: Adjustment) -> None:
            barrier.wait()
            self._store.adjust(adjustment)

        with ThreadPoolExecutor(max_workers=len(adjustments)) as pool:
            list(pool.map(one, adjustments))


class AsyncFace:
    """The async methods, run on one event loop; concurrent hits are gathered tasks."""

    def __init__(self, store: Backend) -> None:
        self._store = store
        self._loop = asyncio.new_event_loop()

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._loop.run_until_complete(coro)

    def hit(self, request: HitRequest) -> Admission:
        return self._run(self._store.ahit(request))

    def release(self, bucket: str, lease: str) -> None:
        self._run(self._store.arelease(bucket, lease))

    def peek(self, bucket: str, policy: LimitPolicy) -> Sequence[LimitState]:
        return self._run(self._store.apeek(bucket, policy))

    def reset(self, bucket: str) -> None:
        self._run(self._store.areset(bucket))

    def adjust(self, adjustment: Adjustment) -> None:
        self._run(self._store.aadjust(adjustment))

    def hit_many(self, requests: Sequence[HitRequest]) -> list[Admission]:
        async def all_at_once() -> list[Admission]:
            return list(await asyncio.gather(*(self._store.ahit(r) for r in requests)))

        return self._run(all_at_once())

    def adjust_many(self, adjustments: Sequence[Adjustment]) -> None:
        async def all_at_once() -> None:
            await asyncio.gather(*(self._store.aadjust(a) for a in adjustments))

        self._run(all_at_once())

    def close(self) -> None:
        try:
            self._run(self._store.aclose())
            self._run(self._loop.shutdown_default_executor())
        finally:
            self._loop.close()


@dataclass
class Rig:
    face: Face
    clock: FakeClock
    kind: str

    def needs_fake_time(self) -> None:
        if self.kind == "limits":
            pytest.skip("limits storages slide windows on their own clock")


def open_store(
    kind: str, clock: FakeClock, tmp_path: Path, request: pytest.FixtureRequest
) -> Backend:
    if kind == "memory":
        return MemoryRateStore(clock=clock, lease_ttl=LEASE_TTL)
    if kind == "sqlite":
        return SQLiteRateStore(tmp_path / "rl.db", clock=clock, lease_ttl=LEASE_TTL)
    if kind == "local":  # the SQLite default: windows in memory, quotas in the file
        return LocalWindowsRateStore(
            MemoryRateStore(clock=clock, lease_ttl=LEASE_TTL),
            SQLiteRateStore(tmp_path / "rl.db", clock=clock, lease_ttl=LEASE_TTL),
        )
    if kind == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        return RedisRateStore.from_url(
            server.url, clock=clock, lease_ttl=LEASE_TTL, prefix=f"c{next(_PREFIXES)}",
            **REDIS_TEST_OPTIONS,
        )  # fmt: skip
    if kind == "redis-cluster":
        cluster: RedisCluster = request.getfixturevalue("redis_cluster")
        options = {**REDIS_TEST_OPTIONS, "max_connections": 256}
        del options["pool_timeout"]
        return RedisRateStore.from_url(
            cluster.url, clock=clock, lease_ttl=LEASE_TTL, prefix=f"c{next(_PREFIXES)}",
            **options,
        )  # fmt: skip
    return LimitsRateStore.from_url("memory://", clock=clock, lease_ttl=LEASE_TTL)


@pytest.fixture(
    params=[
        "memory",
        "sqlite",
        "local",
        "limits",
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("redis-cluster", marks=pytest.mark.redis),
    ]
)
def limiter_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=["sync", "async"])
def rig(request: pytest.FixtureRequest, limiter_kind: str, tmp_path: Path) -> Iterator[Rig]:
    """A fresh store of each backend on a FakeClock, through one of its faces."""
    clock = FakeClock(START)
    store = open_store(limiter_kind, clock, tmp_path, request)
    assert isinstance(store, RateStore)
    assert isinstance(store, AsyncRateStore)
    assert isinstance(store, QuotaAdjuster)
    if request.param == "sync":
        yield Rig(SyncFace(store), clock, limiter_kind)
        store.close()
    else:
        face = AsyncFace(store)
        yield Rig(face, clock, limiter_kind)
        face.close()


def minute(limit: int) -> Window:
    return Window("minute", limit, 60)


def used(states: Sequence[LimitState], name: str) -> int:
    state = next(s for s in states if s.name == name)
    return state.limit - state.remaining


# -- every backend ------------------------------------------------------------------


def test_admits_up_to_the_limit_then_refuses(rig: Rig) -> None:
    """A window admits its limit, then refuses with the window named and a wait."""
    policy = LimitPolicy(windows=(minute(3),))
    results = [rig.face.hit(HitRequest("k", policy)) for _ in range(4)]
    assert [a.allowed for a in results] == [True, True, True, False]
    assert [a.states[0].remaining for a in results] == [2, 1, 0, 0]
    refused = results[-1]
    assert refused.denied_by is not None
    assert refused.denied_by.name == "minute"
    assert refused.retry_after is not None
    assert 0 < refused.retry_after <= 61


def test_states_list_every_limit(rig: Rig) -> None:
    """Every window, quota and the concurrency cap is reported, in order, never negative."""
    policy = LimitPolicy(
        windows=(minute(5), Window("hour", 50, 3600)),
        quotas=(Quota("daily", 9, QuotaPeriod.DAY), Quota("monthly", 90, QuotaPeriod.MONTH)),
        concurrency=2,
    )
    admission = rig.face.hit(HitRequest("k", policy, cost=3, lease="r1"))
    assert admission.allowed
    assert admission.denied_by is None
    assert admission.retry_after is None
    assert [(s.name, s.kind, s.remaining) for s in admission.states] == [
        ("minute", LimitKind.WINDOW, 4),
        ("hour", LimitKind.WINDOW, 49),
        ("daily", LimitKind.QUOTA, 6),
        ("monthly", LimitKind.QUOTA, 87),
        ("concurrency", LimitKind.CONCURRENCY, 1),
    ]
    assert all(s.reset_after >= 0 for s in admission.states)
    assert admission.states[0].window_seconds == 60
    assert list(rig.face.peek("k", policy)) == list(admission.states) or rig.kind == "limits"


def test_t21_refused_request_consumes_nothing(rig: Rig) -> None:
    """A request refused by a window charges neither the other windows nor the quotas."""
    policy = LimitPolicy(
        windows=(minute(2), Window("hour", 100, 3600)),
        quotas=(Quota("daily", 10, QuotaPeriod.DAY),),
    )
    for _ in range(2):
        assert rig.face.hit(HitRequest("k", policy, cost=2)).allowed
    before = rig.face.peek("k", policy)
    for _ in range(5):
        assert not rig.face.hit(HitRequest("k", policy, cost=2)).allowed
    after = rig.face.peek("k", policy)
    assert [used(after, n) for n in ("minute", "hour", "daily")] == [2, 2, 4]
    assert [s.remaining for s in after] == [s.remaining for s in before]


def test_t71_cost_above_capacity(rig: Rig) -> None:
    """A cost above the quota itself is refused with no retry_after, and charges nothing."""
    policy = LimitPolicy(windows=(minute(10),), quotas=(Quota("daily", 5, QuotaPeriod.DAY),))
    admission = rig.face.hit(HitRequest("k", policy, cost=6))
    assert not admission.allowed
    assert admission.retry_after is None
    assert admission.denied_by is not None
    assert admission.denied_by.name == "daily"
    assert [used(rig.face.peek("k", policy), n) for n in ("minute", "daily")] == [0, 0]
    assert rig.face.hit(HitRequest("k", policy, cost=5)).allowed


def test_quota_counts_cost_units(rig: Rig) -> None:
    """Quotas count units: 4 + 4 fit in 10, a further 4 does not, 2 does."""
    policy = LimitPolicy(quotas=(Quota("daily", 10, QuotaPeriod.DAY),))
    assert [rig.face.hit(HitRequest("k", policy, cost=c)).allowed for c in (4, 4, 4, 2)] == [
        True,
        True,
        False,
        True,
    ]
    assert rig.face.peek("k", policy)[0].remaining == 0


def test_quota_resets_at_utc_midnight(rig: Rig) -> None:
    """A spent daily quota says how long until 00:00 UTC, and admits again from then."""
    policy = LimitPolicy(quotas=(Quota("daily", 1, QuotaPeriod.DAY),))
    assert rig.face.hit(HitRequest("k", policy)).allowed
    refused = rig.face.hit(HitRequest("k", policy))
    assert refused.retry_after == pytest.approx(12 * 3600)
    rig.clock.advance(12 * 3600)
    assert rig.face.hit(HitRequest("k", policy)).allowed


def test_peek_and_empty_policy_consume_nothing(rig: Rig) -> None:
    """Peeking charges nothing, and a policy with no limits admits with no states."""
    policy = LimitPolicy(windows=(minute(1),), quotas=(Quota("daily", 1, QuotaPeriod.DAY),))
    for _ in range(3):
        assert [s.remaining for s in rig.face.peek("k", policy)] == [1, 1]
    empty = rig.face.hit(HitRequest("k", LimitPolicy()))
    assert empty.allowed
    assert empty.states == ()


def test_buckets_and_scopes_count_apart(rig: Rig) -> None:
    """Two buckets, and two scopes of one bucket, have their own counters."""
    key = LimitPolicy(windows=(minute(1),))
    service = LimitPolicy(windows=(Window("minute", 1, 60, "svc:a/b"),))
    assert rig.face.hit(HitRequest("k", key)).allowed
    assert rig.face.hit(HitRequest("other", key)).allowed
    assert rig.face.hit(HitRequest("k", service)).allowed
    assert not rig.face.hit(HitRequest("k", key)).allowed


def test_reset_clears_a_bucket(rig: Rig) -> None:
    """After reset a bucket starts from nothing; other buckets are untouched."""
    policy = LimitPolicy(windows=(minute(1),), quotas=(Quota("daily", 1, QuotaPeriod.DAY),))
    for bucket in ("k", "other"):
        assert rig.face.hit(HitRequest(bucket, policy)).allowed
    rig.face.reset("k")
    assert rig.face.hit(HitRequest("k", policy)).allowed
    assert not rig.face.hit(HitRequest("other", policy)).allowed


# -- concurrency slots --------------------------------------------------------------


def test_release_frees_a_slot(rig: Rig) -> None:
    """A released slot can be taken by the next request."""
    policy = LimitPolicy(concurrency=1)
    assert rig.face.hit(HitRequest("k", policy, lease="a")).allowed
    refused = rig.face.hit(HitRequest("k", policy, lease="b"))
    assert not refused.allowed
    assert refused.denied_by is not None
    assert refused.denied_by.kind is LimitKind.CONCURRENCY
    rig.face.release("k", "a")
    assert rig.face.hit(HitRequest("k", policy, lease="b")).allowed


def test_t85_double_or_stray_release(rig: Rig) -> None:
    """Releasing twice, or a lease never taken, is harmless and never goes below zero."""
    policy = LimitPolicy(concurrency=2)
    rig.face.release("k", "never-taken")
    assert rig.face.hit(HitRequest("k", policy, lease="a")).allowed
    for _ in range(3):
        rig.face.release("k", "a")
    assert rig.face.peek("k", policy)[0].remaining == 2
    assert [rig.face.hit(HitRequest("k", policy, lease=x)).allowed for x in "bcd"] == [
        True,
        True,
        False,
    ]


def test_t84_crash_while_holding_slots(rig: Rig) -> None:
    """Slots of a worker that died (never released) come back after the lease TTL."""
    policy = LimitPolicy(concurrency=5)
    for n in range(5):
        assert rig.face.hit(HitRequest("k", policy, lease=f"dead{n}")).allowed
    assert not rig.face.hit(HitRequest("k", policy, lease="x")).allowed
    rig.clock.advance(LEASE_TTL - 1)
    assert not rig.face.hit(HitRequest("k", policy, lease="x")).allowed
    rig.clock.advance(1)
    assert rig.face.peek("k", policy)[0].remaining == 5
    assert rig.face.hit(HitRequest("k", policy, lease="x")).allowed


def test_t86_limit_enforced_no_queueing(rig: Rig) -> None:
    """Cap 5 and 50 simultaneous acquisitions: exactly 5 get a slot, 45 are refused at once."""
    policy = LimitPolicy(concurrency=5)
    results = rig.face.hit_many([HitRequest("k", policy, lease=f"r{n}") for n in range(50)])
    assert sum(a.allowed for a in results) == 5
    assert all(a.retry_after is not None for a in results if not a.allowed)


def test_t68_exact_admission_under_concurrency(rig: Rig) -> None:
    """Limit 10, clock frozen, 200 simultaneous hits: exactly 10 are admitted."""
    policy = LimitPolicy(windows=(Window("second", 10, 1),))
    if rig.kind == "limits":  # its clock is real: a minute window cannot roll over mid-test
        policy = LimitPolicy(windows=(minute(10),))
    results = rig.face.hit_many([HitRequest("k", policy)] * 200)
    assert sum(a.allowed for a in results) == 10


# -- settling reserved units (Adjustment) ------------------------------------------

DAY_ID, MONTH_ID = "2027-01-15", "2027-01"  # START's UTC day and month


def charged(*quotas: Quota, day: str = DAY_ID, month: str = MONTH_ID) -> tuple[QuotaCharge, ...]:
    """The charges an admission under ``quotas`` at START made."""
    return tuple(
        QuotaCharge(q.period, q.scope, day if q.period is QuotaPeriod.DAY else month)
        for q in quotas
    )


DAILY, MONTHLY = Quota("daily", 10, QuotaPeriod.DAY), Quota("monthly", 100, QuotaPeriod.MONTH)


def test_adjust_refunds_and_charges_every_quota(rig: Rig) -> None:
    """A refund gives units back to every quota charged, a charge takes more; windows stay."""
    policy = LimitPolicy(windows=(minute(5),), quotas=(DAILY, MONTHLY))
    assert rig.face.hit(HitRequest("k", policy, cost=8)).allowed
    rig.face.adjust(Adjustment("k", charged(DAILY, MONTHLY), -6))
    assert [used(rig.face.peek("k", policy), n) for n in ("minute", "daily", "monthly")] == [
        1,
        2,
        2,
    ]
    rig.face.adjust(Adjustment("k", charged(DAILY, MONTHLY), 3))
    assert [used(rig.face.peek("k", policy), n) for n in ("daily", "monthly")] == [5, 5]
    assert rig.face.hit(HitRequest("k", policy, cost=5)).allowed
    assert not rig.face.hit(HitRequest("k", policy, cost=1)).allowed


def test_adjust_never_refuses_and_clamps(rig: Rig) -> None:
    """A charge may pass the limit (remaining reads 0); a refund stops at zero."""
    policy = LimitPolicy(quotas=(DAILY,))
    assert rig.face.hit(HitRequest("k", policy, cost=9)).allowed
    rig.face.adjust(Adjustment("k", charged(DAILY), 7))
    state = rig.face.peek("k", policy)[0]
    assert state.remaining == 0
    assert not rig.face.hit(HitRequest("k", policy, cost=1)).allowed
    rig.face.adjust(Adjustment("k", charged(DAILY), -100))
    assert rig.face.peek("k", policy)[0].remaining == 10
    assert rig.face.hit(HitRequest("k", policy, cost=10)).allowed


def test_adjust_unknown_bucket_and_zero_reservation(rig: Rig) -> None:
    """A refund to nothing stays nothing; a charge after a 0-unit reservation counts."""
    policy = LimitPolicy(quotas=(DAILY,))
    rig.face.adjust(Adjustment("nobody", charged(DAILY), -3))
    assert rig.face.peek("nobody", policy)[0].remaining == 10
    assert rig.face.hit(HitRequest("k", policy, cost=0)).allowed
    rig.face.adjust(Adjustment("k", charged(DAILY), 4))
    rig.face.adjust(Adjustment("k", charged(DAILY), 0))
    rig.face.adjust(Adjustment("k", (), -4))
    assert used(rig.face.peek("k", policy), "daily") == 4


def test_adjust_after_rollover_leaves_the_new_period(rig: Rig) -> None:
    """A refund for yesterday's admission credits nothing today; a late charge bills nothing."""
    policy = LimitPolicy(quotas=(DAILY, MONTHLY))
    assert rig.face.hit(HitRequest("k", policy, cost=8)).allowed
    rig.clock.advance(12 * 3600)  # 00:00 UTC, January 16th
    assert rig.face.hit(HitRequest("k", policy, cost=2)).allowed
    rig.face.adjust(Adjustment("k", charged(DAILY, MONTHLY), -8))
    assert [used(rig.face.peek("k", policy), n) for n in ("daily", "monthly")] == [2, 2]
    rig.face.adjust(Adjustment("k", charged(DAILY, MONTHLY), 5))
    assert [used(rig.face.peek("k", policy), n) for n in ("daily", "monthly")] == [2, 7]


def test_adjust_scopes_and_shared_counters(rig: Rig) -> None:
    """Each scope's counter moves apart; quotas of one shape share a counter, moved once."""
    service = Quota("svc-daily", 50, QuotaPeriod.DAY, "svc:chat")
    twin = Quota("daily-twin", 20, QuotaPeriod.DAY)
    policy = LimitPolicy(quotas=(DAILY, twin, service))
    assert rig.face.hit(HitRequest("k", policy, cost=6)).allowed
    assert [used(rig.face.peek("k", policy), n) for n in ("daily", "daily-twin")] == [6, 6]
    rig.face.adjust(Adjustment("k", charged(DAILY, twin), -4))
    assert [used(rig.face.peek("k", policy), n) for n in ("daily", "daily-twin", "svc-daily")] == [
        2,
        2,
        6,
    ]
    rig.face.adjust(Adjustment("k", charged(service), -6))
    assert used(rig.face.peek("k", policy), "svc-daily") == 0


def test_adjust_is_atomic_under_concurrency(rig: Rig) -> None:
    """40 simultaneous refunds of 1 after 40 hits of 3 units: exactly 80 units stay."""
    quota = Quota("daily", 1000, QuotaPeriod.DAY)
    policy = LimitPolicy(quotas=(quota,))
    assert all(a.allowed for a in rig.face.hit_many([HitRequest("k", policy, cost=3)] * 40))
    rig.face.adjust_many([Adjustment("k", charged(quota), -1)] * 40)
    assert used(rig.face.peek("k", policy), "daily") == 80


def test_adjust_refuses_a_delta_that_is_no_whole_number(rig: Rig) -> None:
    """A delta of another type is a programming error, not a silent no-op."""
    with pytest.raises(ValueError, match="whole number"):
        rig.face.adjust(Adjustment("k", charged(DAILY), True))
    with pytest.raises(ValueError, match="whole number"):
        rig.face.adjust(Adjustment("k", charged(DAILY), 1.5))  # type: ignore[arg-type]


# -- backends whose windows follow the injected clock -------------------------------


def test_t69_multi_window_atomicity(rig: Rig) -> None:
    """{5/s, 20/min}, 100 requests at each of t = 0..4 s: 5 a second, minute 5..20, 20."""
    rig.needs_fake_time()
    policy = LimitPolicy(windows=(Window("second", 5, 1), Window("minute", 20, 60)))
    admitted, minute_used = [], []
    for _ in range(5):
        admitted.append(sum(rig.face.hit(HitRequest("k", policy)).allowed for _ in range(100)))
        minute_used.append(used(rig.face.peek("k", policy), "minute"))
        rig.clock.advance(1)
    assert admitted == [5, 5, 5, 5, 0]
    assert minute_used == [5, 10, 15, 20, 20]


@pytest.mark.parametrize(
    ("arrivals", "limit"),
    [((0.0, 0.0, 0.0), 3), ((0.0, 2.5, 7.9, 9.99), 3), ((0.4, 0.4, 5.5), 2), ((1.0,), 1)],
)
def test_t72_retry_after_is_truthful(rig: Rig, arrivals: tuple[float, ...], limit: int) -> None:
    """Once full, a request exactly retry_after later is admitted; earlier is refused."""
    rig.needs_fake_time()
    policy = LimitPolicy(windows=(Window("10-second", limit, 10),))
    elapsed = 0.0
    for arrival in arrivals:
        rig.clock.advance(arrival - elapsed)
        elapsed = arrival
        rig.face.hit(HitRequest("k", policy))
    refused = rig.face.hit(HitRequest("k", policy))
    assert not refused.allowed
    assert refused.retry_after is not None
    assert refused.denied_by is not None
    assert refused.retry_after >= refused.denied_by.reset_after
    rig.clock.advance(refused.retry_after - 0.002)
    assert not rig.face.hit(HitRequest("k", policy)).allowed
    rig.clock.advance(0.002)
    assert rig.face.hit(HitRequest("k", policy)).allowed


def test_window_slides_with_the_clock(rig: Rig) -> None:
    """Requests leave a minute window a minute (plus at most one slot) after they came."""
    rig.needs_fake_time()
    policy = LimitPolicy(windows=(minute(2),))
    assert rig.face.hit(HitRequest("k", policy)).allowed
    rig.clock.advance(30)
    assert rig.face.hit(HitRequest("k", policy)).allowed
    assert not rig.face.hit(HitRequest("k", policy)).allowed
    rig.clock.advance(31)
    assert rig.face.hit(HitRequest("k", policy)).allowed
    assert used(rig.face.peek("k", policy), "minute") == 2


# -- the limits adapter's own edges -------------------------------------------------


def test_limits_adapter_refuses_bad_configuration() -> None:
    """Unknown schemes, async URLs and strategies limits cannot run are ConfigurationErrors."""
    with pytest.raises(ConfigurationError):
        LimitsRateStore.from_url("nope://")
    with pytest.raises(ConfigurationError):
        LimitsRateStore.from_url("async+memory://")
    with pytest.raises(ConfigurationError):
        LimitsRateStore.from_url("memory://", strategy="fixed-window")  # type: ignore[arg-type]


def test_limits_adapter_sliding_window_counter() -> None:
    """The cheaper sliding-window-counter strategy enforces a window too."""
    store = LimitsRateStore.from_url("memory://", strategy="sliding-window-counter")
    policy = LimitPolicy(windows=(minute(2),))
    assert [store.hit(HitRequest("k", policy)).allowed for _ in range(3)] == [True, True, False]
    assert "MemoryStorage" in repr(store)


def test_limits_adapter_wraps_storage_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    """A failing limits storage surfaces as StorageError, with the driver error as cause."""
    storage = MemoryStorage()
    store = LimitsRateStore(storage)

    def broken(*args: object, **kwargs: object) -> tuple[float, int]:
        raise ValueError("storage down")

    monkeypatch.setattr(storage, "get_moving_window", broken)
    policy = LimitPolicy(windows=(minute(2),))
    with pytest.raises(StorageError) as info:
        store.hit(HitRequest("secret-bucket", policy))
    assert "secret-bucket" not in str(info.value)
    assert isinstance(info.value.__cause__, ValueError)
    with pytest.raises(StorageError):
        store.peek("k", policy)
