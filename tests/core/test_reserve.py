"""Reserve after admission: units the app learns from the body, taken or refused
atomically across the key's quotas, and settled with the rest."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.core.test_settle import START, World, req

from keyguard.backends.memory_limiter import MemoryRateStore
from keyguard.backends.sqlite_limiter import SQLiteRateStore
from keyguard.denials import Denial
from keyguard.errors import StorageError
from keyguard.guard import Allow
from keyguard.limiting import Admission, HitRequest
from keyguard.testing import FakeClock


@pytest.fixture
def world() -> World:
    clock = FakeClock(START)
    return World(MemoryRateStore(clock=clock), clock)


def test_reserve_takes_units_from_every_quota_and_settle_returns_the_rest(world: World) -> None:
    identity = world.admit()  # one unit, as a service costing 1 is admitted
    assert world.guard.reserve(identity, 499) is None
    assert world.used() == {"minute": 1, "daily": 500, "monthly": 500}
    world.guard.settle(identity, 120)
    assert world.used() == {"minute": 1, "daily": 120, "monthly": 120}


def test_a_reservation_that_does_not_fit_is_refused_and_takes_nothing(world: World) -> None:
    identity = world.admit(cost=900)
    refused = world.guard.reserve(identity, 200)  # the daily quota holds 1000
    assert isinstance(refused, Denial)
    assert refused.code == "quota_exceeded"
    assert refused.status == 429
    assert any(name == b"ratelimit" for name, _ in refused.headers)
    assert world.used() == {"minute": 1, "daily": 900, "monthly": 900}
    world.guard.settle(identity, 0)
    assert world.used() == {"minute": 1, "daily": 0, "monthly": 0}


def test_reserve_after_settle_takes_nothing(world: World) -> None:
    identity = world.admit(cost=10)
    world.guard.settle(identity, 10)
    assert world.guard.reserve(identity, 50) is None
    assert world.used() == {"minute": 1, "daily": 10, "monthly": 10}


def test_reserving_zero_or_without_a_charge_is_a_no_op(world: World) -> None:
    identity = world.admit()
    assert world.guard.reserve(identity, 0) is None
    assert world.used()["daily"] == 1
    with pytest.raises(ValueError, match="whole number"):
        world.guard.reserve(identity, -1)
    with pytest.raises(ValueError, match="whole number"):
        world.guard.reserve(identity, True)


def test_async_reserve_on_sqlite(tmp_path: Path) -> None:
    clock = FakeClock(START)
    world = World(SQLiteRateStore(tmp_path / "limits.db", clock=clock), clock)
    assert not world.guard.inline

    async def scenario() -> Denial | None:
        identity = await world.aadmit()
        assert await world.guard.areserve(identity, 299) is None
        refused = await world.guard.areserve(identity, 800)
        await world.guard.asettle(identity, 42)
        return refused

    refused = asyncio.run(scenario())
    assert isinstance(refused, Denial)
    assert world.used() == {"minute": 1, "daily": 42, "monthly": 42}


class Failing(MemoryRateStore):
    def hit(self, request: HitRequest) -> Admission:
        if not request.policy.windows:  # only the reservation fails
            raise StorageError("down")
        return super().hit(request)


def test_a_failing_store_answers_as_on_limiter_error_says() -> None:
    clock = FakeClock(START)
    world = World(Failing(clock=clock), clock)
    identity = world.admit()
    refused = world.guard.reserve(identity, 10)
    assert isinstance(refused, Denial)
    assert refused.code == "limiter_unavailable"
    assert world.telemetry.errors == ["limits"]
    world.guard.on_limiter_error = "allow"
    assert world.guard.reserve(identity, 10) is None


@settings(max_examples=60, deadline=None)
@given(
    st.integers(0, 1000),
    st.lists(st.integers(0, 600), min_size=1, max_size=5),
    st.integers(0, 3000),
)
def test_quota_never_counts_more_than_reserved_or_used(
    cost: int, reservations: list[int], used: int
) -> None:
    """Whatever is reserved and refused, the daily quota ends at what settle says,
    and never took a reservation that would have crossed its limit."""
    clock = FakeClock(START)
    world = World(MemoryRateStore(clock=clock), clock)
    identity = world.admit(cost=cost)
    held = cost
    for units in reservations:
        if world.guard.reserve(identity, units) is None:
            held += units
        assert world.used()["daily"] == held <= 1000
    world.guard.settle(identity, used)
    assert world.used()["daily"] == min(used, 1000)  # over the limit reads as the limit


def test_usage_records_the_units_a_request_settled_to() -> None:
    """Usage counts what a request really cost: the settled units, else the reserved."""
    from keyguard.backends.memory_usage import MemoryUsageStore
    from keyguard.usage.recorder import UsageRecorder
    from keyguard.usage.records import Granularity, RowQuery

    clock = FakeClock(START)
    world = World(MemoryRateStore(clock=clock), clock)
    store = MemoryUsageStore()
    world.guard.usage = UsageRecorder(store, clock=clock)
    settled, reserved = world.admit(cost=100), world.admit()
    assert world.guard.reserve(reserved, 49) is None
    world.guard.settle(settled, 7)
    for identity in (settled, reserved):
        allow = Allow(identity, cost=identity.units)
        world.guard.finished(req(world.secret), allow, 200, 0.0)
    world.guard.usage.close()
    (day,) = store.rows(RowQuery(Granularity.DAY, 0, 2**40))
    assert day.counts.units == 7 + 50
