"""The in-process rate store: monotonic windows, bounded memory, no live counter evicted."""

from __future__ import annotations

import threading
import tracemalloc
from datetime import UTC, datetime

import pytest

from keyguard.backends.memory_limiter import CAPACITY, MemoryRateStore
from keyguard.errors import ConfigurationError
from keyguard.limiting import (
    AsyncRateStore,
    HitRequest,
    LimitPolicy,
    Quota,
    QuotaPeriod,
    RateStore,
    Window,
)
from keyguard.testing import FakeClock

START = datetime(2027, 1, 15, 12, tzinfo=UTC)
HOURLY = LimitPolicy(windows=(Window("hour", 1, 3600),))


def test_one_class_two_faces() -> None:
    """The memory store satisfies both protocols and opens from memory://."""
    store = MemoryRateStore.from_url("memory://", max_entries=5)
    assert isinstance(store, RateStore)
    assert isinstance(store, AsyncRateStore)
    assert "max_entries=5" in repr(store)
    with pytest.raises(ConfigurationError):
        MemoryRateStore.from_url("memory://somewhere")
    with pytest.raises(ConfigurationError):
        MemoryRateStore(max_entries=0)


def test_t68_exact_admission_under_concurrency() -> None:
    """200 threads hit a 10/s window on a frozen clock: exactly 10 pass, across 3 windows too."""
    store = MemoryRateStore(clock=FakeClock(START))
    policy = LimitPolicy(
        windows=(Window("second", 10, 1), Window("minute", 50, 60), Window("hour", 90, 3600))
    )
    barrier = threading.Barrier(200)
    admitted: list[bool] = []

    def worker() -> None:
        barrier.wait()
        admitted.append(store.hit(HitRequest("k", policy)).allowed)

    threads = [threading.Thread(target=worker) for _ in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(admitted) == 10
    assert [s.remaining for s in store.peek("k", policy)] == [0, 40, 80]


def test_t74_clock_steps() -> None:
    """Stepping the wall clock an hour back or forth neither resets a window nor locks out."""
    clock = FakeClock(START)
    store = MemoryRateStore(clock=clock)
    policy = LimitPolicy(windows=(Window("minute", 3, 60),))
    for _ in range(3):
        assert store.hit(HitRequest("k", policy)).allowed
    clock.set_wall(clock.now() + 3600)
    assert not store.hit(HitRequest("k", policy)).allowed  # no reset
    clock.set_wall(clock.now() - 7200)
    refused = store.hit(HitRequest("k", policy))
    assert not refused.allowed  # still no reset
    assert refused.retry_after is not None
    assert refused.retry_after <= 61
    clock.advance(refused.retry_after)
    assert store.hit(HitRequest("k", policy)).allowed


def test_quotas_follow_the_wall_calendar() -> None:
    """Quotas, unlike windows, read the wall clock: a new UTC day starts them over."""
    clock = FakeClock(datetime(2027, 1, 15, 23, 59, tzinfo=UTC))
    store = MemoryRateStore(clock=clock)
    policy = LimitPolicy(quotas=(Quota("daily", 1, QuotaPeriod.DAY),))
    assert store.hit(HitRequest("k", policy)).allowed
    assert not store.hit(HitRequest("k", policy)).allowed
    clock.advance(60)
    assert store.hit(HitRequest("k", policy)).allowed


def test_idle_buckets_are_dropped_lazily() -> None:
    """Buckets whose windows emptied go away on later calls, with no background thread."""
    clock = FakeClock(START)
    store = MemoryRateStore(clock=clock)
    threads = threading.active_count()
    policy = LimitPolicy(windows=(Window("minute", 5, 60),))
    for n in range(50):
        store.hit(HitRequest(f"k{n}", policy))
    assert len(store) == 50
    clock.advance(61)
    for _ in range(10):
        store.hit(HitRequest("fresh", policy))
    assert len(store) == 1
    assert threading.active_count() == threads


def test_refused_new_bucket_stores_nothing() -> None:
    """A refused hit on an unknown bucket (cost above capacity) creates no entry."""
    store = MemoryRateStore(clock=FakeClock(START))
    policy = LimitPolicy(quotas=(Quota("daily", 1, QuotaPeriod.DAY),))
    assert not store.hit(HitRequest("k", policy, cost=2)).allowed
    store.release("k", "nothing")
    assert len(store) == 0


def test_t87_many_distinct_keys_bounded_memory() -> None:
    """12k distinct buckets through a 1,000-entry store: entries and memory stay bounded."""
    clock = FakeClock(START)
    store = MemoryRateStore(clock=clock, max_entries=1000)
    policy = LimitPolicy(windows=(Window("minute", 5, 60), Window("hour", 50, 3600)))
    tracemalloc.start()
    try:
        for n in range(12_000):
            store.hit(HitRequest(f"ip-{n}", policy))
            assert len(store) <= 1000
            if n == 2_000:
                settled = tracemalloc.get_traced_memory()[0]
            clock.advance(0.5)  # the hour window keeps ~7,200 keys live: the bound must hold
        grown = tracemalloc.get_traced_memory()[0] - settled
    finally:
        tracemalloc.stop()
    assert grown < 512 * 1024


def test_t88_eviction_never_resets_live_counter() -> None:
    """A table full of live attacker buckets refuses new buckets; the target stays limited."""
    clock = FakeClock(START)
    store = MemoryRateStore(clock=clock, max_entries=100)
    assert store.hit(HitRequest("target", HOURLY)).allowed
    for n in range(99):
        assert store.hit(HitRequest(f"attacker-{n}", HOURLY)).allowed
    refused = store.hit(HitRequest("attacker-new", HOURLY))
    assert not refused.allowed
    assert refused.denied_by is not None
    assert refused.denied_by.name == CAPACITY
    assert refused.retry_after is not None
    assert 0 < refused.retry_after <= 3660
    target = store.hit(HitRequest("target", HOURLY))
    assert not target.allowed
    assert target.denied_by is not None
    assert target.denied_by.name == "hour"
    clock.advance(refused.retry_after)
    assert store.hit(HitRequest("attacker-new", HOURLY)).allowed
    assert store.hit(HitRequest("target", HOURLY)).allowed


def test_busy_bucket_outlives_its_first_idle_time() -> None:
    """A bucket hit again is kept until its last request leaves; hits add no heap rows."""
    clock = FakeClock(START)
    store = MemoryRateStore(clock=clock)
    policy = LimitPolicy(windows=(Window("minute", 100, 60),))
    for _ in range(50):
        assert store.hit(HitRequest("k", policy)).allowed
    clock.advance(50)
    assert store.hit(HitRequest("k", policy)).allowed
    assert len(store._idle) == 1  # one row per bucket, however often it is hit
    clock.advance(11)  # the first 50 requests have left, the 51st has not
    store.hit(HitRequest("other", policy))
    assert len(store) == 2
    assert store.peek("k", policy)[0].remaining == 99
    clock.advance(50)  # now the 51st has left too
    store.hit(HitRequest("other", policy))
    assert len(store) == 1
    assert store.peek("k", policy)[0].remaining == 100


def test_capacity_wait_follows_buckets_hit_again() -> None:
    """A full table's retry_after is when a bucket really goes idle, not its first guess."""
    clock = FakeClock(START)
    store = MemoryRateStore(clock=clock, max_entries=2)
    policy = LimitPolicy(windows=(Window("minute", 5, 60),))
    assert store.hit(HitRequest("a", policy)).allowed  # idle at 60 ...
    clock.advance(10)
    assert store.hit(HitRequest("b", policy)).allowed  # idle at 70
    clock.advance(10)
    assert store.hit(HitRequest("a", policy)).allowed  # ... now at 80
    clock.advance(10)
    refused = store.hit(HitRequest("c", policy))
    assert not refused.allowed
    assert refused.retry_after == pytest.approx(40)
    clock.advance(39.999)
    assert not store.hit(HitRequest("c", policy)).allowed
    clock.advance(0.001)
    assert store.hit(HitRequest("c", policy)).allowed
    assert store.peek("a", policy)[0].remaining == 4  # its request at 20 still counts


def test_full_table_still_serves_known_buckets_and_releases() -> None:
    """At capacity, existing buckets keep working: hits, peeks, releases and resets."""
    clock = FakeClock(START)
    store = MemoryRateStore(clock=clock, max_entries=2, lease_ttl=10)
    capped = LimitPolicy(concurrency=1)
    assert store.hit(HitRequest("a", capped, lease="x")).allowed
    assert store.hit(HitRequest("b", capped, lease="y")).allowed
    assert not store.hit(HitRequest("c", capped, lease="z")).allowed
    store.release("a", "x")
    assert len(store) == 1
    assert store.hit(HitRequest("c", capped, lease="z")).allowed
    store.reset("b")
    assert store.peek("b", capped)[0].remaining == 1
    store.close()
    assert len(store) == 0


async def test_async_face_calls_through() -> None:
    """The async methods give the same answers as the sync ones."""
    store = MemoryRateStore(clock=FakeClock(START))
    policy = LimitPolicy(windows=(Window("minute", 1, 60),), concurrency=1)
    assert (await store.ahit(HitRequest("k", policy, lease="a"))).allowed
    assert not (await store.ahit(HitRequest("k", policy, lease="b"))).allowed
    await store.arelease("k", "a")
    assert [s.remaining for s in await store.apeek("k", policy)] == [0, 1]
    await store.areset("k")
    assert (await store.ahit(HitRequest("k", policy, lease="b"))).allowed
    await store.aclose()
