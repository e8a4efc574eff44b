"""Reserve and settle: an admission reserves units, the app settles to what was used."""

from __future__ import annotations

import asyncio
import copy
import logging
import random
import threading
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keyguard.backends.memory import MemoryKeyStore
from keyguard.backends.memory_limiter import MemoryRateStore
from keyguard.backends.sqlite_limiter import SQLiteRateStore
from keyguard.decisions import Charge
from keyguard.denials import Denial
from keyguard.errors import StorageError
from keyguard.guard import Allow, Guard, Identity
from keyguard.limiting import (
    Adjustment,
    Admission,
    HitRequest,
    LimitPolicy,
    LimitState,
    Quota,
    QuotaAdjuster,
    QuotaPeriod,
    RateBackend,
    Window,
)
from keyguard.manager import KeyManager
from keyguard.plans import Plan, ServiceLimits
from keyguard.request import RequestInfo
from keyguard.scopes import RouteMap, RouteRule
from keyguard.telemetry import Telemetry
from keyguard.testing import FakeClock

START = datetime(2027, 1, 15, 12, tzinfo=UTC)
ROUTES = RouteMap(
    [
        RouteRule("POST", "/v1/chat/completions", "chat:completions"),
        RouteRule("POST", "/v1/images", "image:create"),
    ]
)
PLANS = {"free": Plan("free", "100/minute", 1000, 10_000, None)}
SERVICES = {"image:create": ServiceLimits(cost=40)}
POLICY = LimitPolicy(
    windows=(Window("minute", 100, 60),),
    quotas=(Quota("daily", 1000, QuotaPeriod.DAY), Quota("monthly", 10_000, QuotaPeriod.MONTH)),
)


def req(key: str, path: str = "/v1/chat/completions") -> RequestInfo:
    return RequestInfo(method="POST", path=path, headers=((b"x-api-key", key.encode()),))


class CountingTelemetry(Telemetry):
    def __init__(self) -> None:
        super().__init__()
        self.errors: list[str] = []

    def storage_error(self, store: str) -> None:
        self.errors.append(store)


class World:
    """A guard over memory keys and the given limiter, a key, and the limiter's view."""

    def __init__(self, limiter: RateBackend, clock: FakeClock) -> None:
        keys = MemoryKeyStore()
        self.clock = clock
        self.limiter = limiter
        self.telemetry = CountingTelemetry()
        self.guard = Guard(
            keys=keys,
            limiter=limiter,
            routes=ROUTES,
            plans=PLANS,
            services=SERVICES,
            clock=clock,
            telemetry=self.telemetry,
        )
        self.key = KeyManager(keys, clock=clock).create("k", scopes=["*"])
        self.secret = self.key.key.reveal()

    def admit(self, cost: int | None = None, path: str = "/v1/chat/completions") -> Identity:
        decision = self.guard.check(req(self.secret, path), cost=cost)
        assert isinstance(decision, Allow), decision
        assert decision.identity is not None
        return decision.identity

    async def aadmit(self, cost: int | None = None) -> Identity:
        decision = await self.guard.acheck(req(self.secret), cost=cost)
        assert isinstance(decision, Allow), decision
        assert decision.identity is not None
        return decision.identity

    def used(self) -> dict[str, int]:
        """Units each quota counts now (its remaining, under the limit), and the
        requests the minute window counts."""
        states: Sequence[LimitState] = self.limiter.peek(self.key.record.id, POLICY)
        return {s.name: s.limit - s.remaining for s in states}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START)


@pytest.fixture
def world(clock: FakeClock) -> World:
    return World(MemoryRateStore(clock=clock), clock)


def test_settle_returns_the_unused_units(world: World) -> None:
    """A reservation of 500 settled to 120 leaves 120 on both quotas; the window counts 1."""
    identity = world.admit(cost=500)
    assert identity.units == 500
    assert identity.charge is not None
    assert world.used() == {"minute": 1, "daily": 500, "monthly": 500}
    world.guard.settle(identity, 120)
    assert world.used() == {"minute": 1, "daily": 120, "monthly": 120}


def test_settle_charges_extra_without_refusing(world: World) -> None:
    """Using more than reserved charges the extra, even past the limit; remaining reads 0."""
    identity = world.admit(cost=900)
    world.guard.settle(identity, 1300)
    assert world.used() == {"minute": 1, "daily": 1000, "monthly": 1300}
    refused = world.guard.check(req(world.secret), cost=1)
    assert isinstance(refused, Denial)
    assert refused.code == "quota_exceeded"


def test_settle_to_zero_refunds_everything(world: World) -> None:
    """A provider error settles to 0: the whole reservation comes back."""
    identity = world.admit(cost=700)
    world.guard.settle(identity, 0)
    assert world.used() == {"minute": 1, "daily": 0, "monthly": 0}


def test_service_cost_is_the_reservation(world: World) -> None:
    """With no cost given, the service's cost is what is reserved and settled."""
    identity = world.admit(path="/v1/images")
    assert identity.units == 40
    world.guard.settle(identity, 10)
    assert world.used()["daily"] == 10


def test_settling_twice_refunds_once(world: World) -> None:
    """Only the first settlement applies; copies of the identity share the one handle."""
    identity = world.admit(cost=500)
    world.guard.settle(identity, 100)
    world.guard.settle(identity, 0)
    world.guard.settle(copy.deepcopy(identity), 0)
    world.guard.settle(replace(identity, service="x"), 0)
    assert copy.copy(identity).charge is identity.charge
    assert world.used()["daily"] == 100


def test_concurrent_settlements_apply_once(world: World) -> None:
    """Sixteen threads settle one identity at once: exactly one refund lands."""
    identity = world.admit(cost=500)
    barrier = threading.Barrier(16)

    def settle(used: int) -> None:
        barrier.wait()
        world.guard.settle(identity, used)

    threads = [threading.Thread(target=settle, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert world.used()["daily"] in range(16)


def test_settle_after_midnight_leaves_the_new_day(world: World, clock: FakeClock) -> None:
    """A refund settled after the UTC day rolled over credits yesterday, not today."""
    clock.advance(12 * 3600 - 5)  # 23:59:55 UTC
    identity = world.admit(cost=800)
    clock.advance(10)  # 00:00:05 UTC, the next day
    today = world.admit(cost=300)
    world.guard.settle(identity, 0)
    assert world.used() == {"minute": 2, "daily": 300, "monthly": 300}
    world.guard.settle(today, 50)
    assert world.used()["daily"] == 50


def test_nothing_to_settle_is_a_no_op(clock: FakeClock) -> None:
    """No quota, a limiter that failed open, or no limiter: settling does nothing."""
    keys = MemoryKeyStore()
    manager = KeyManager(keys, clock=clock)
    secret = manager.create("k").key.reveal()
    no_quota = Guard(
        keys=keys, limiter=MemoryRateStore(clock=clock), plans={"free": Plan("free", "5/minute")}
    )
    no_limiter = Guard(keys=keys, limiter=None)
    failed_open = Guard(
        keys=keys, limiter=DownLimiter(clock=clock), plans=PLANS, on_limiter_error="allow"
    )
    for guard in (no_quota, no_limiter, failed_open):
        decision = guard.check(req(secret), cost=5)
        assert isinstance(decision, Allow)
        assert decision.identity is not None
        assert decision.identity.charge is None
        assert decision.identity.units == 5
        guard.settle(decision.identity, 1)
        asyncio.run(guard.asettle(decision.identity, 1))


def test_used_must_be_a_whole_number(world: World) -> None:
    """A negative, fractional or boolean count is a programming error."""
    identity = world.admit(cost=5)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="whole number"):
            world.guard.settle(identity, bad)  # type: ignore[arg-type]
    world.guard.settle(identity, 2)
    assert world.used()["daily"] == 2


def test_identity_hides_the_handle(world: World) -> None:
    """The handle is out of the identity's repr and equality; its own repr shows no policy."""
    first, second = world.admit(cost=5), world.admit(cost=5)
    assert "charge" not in repr(first)
    assert "Quota" not in repr(first.charge)
    assert replace(first, limits=second.limits) == replace(second, limits=second.limits)
    assert isinstance(first.charge, Charge)
    assert not first.charge.spent
    world.guard.settle(first, 5)
    assert first.charge.spent


class DownLimiter(MemoryRateStore):
    """A limiter whose store is down for hits and adjustments."""

    def hit(self, request: HitRequest) -> Admission:
        raise StorageError("down: secret-bucket")

    def adjust(self, adjustment: Adjustment) -> None:
        raise StorageError("down: secret-bucket")


class FailingAdjust(MemoryRateStore):
    failing = False

    def adjust(self, adjustment: Adjustment) -> None:
        if self.failing:
            raise StorageError("down: secret-bucket")
        super().adjust(adjustment)


def test_storage_error_while_settling_is_logged_not_raised(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A failing store is logged (its type only) and counted; the app sees nothing."""
    limiter = FailingAdjust(clock=clock)
    world = World(limiter, clock)
    identity = world.admit(cost=500)
    limiter.failing = True
    with caplog.at_level(logging.WARNING, logger="keyguard"):
        world.guard.settle(identity, 100)
    assert world.telemetry.errors == ["limits"]
    assert "StorageError" in caplog.text
    assert "secret-bucket" not in caplog.text
    assert world.key.record.id not in caplog.text
    assert world.used()["daily"] == 500  # the reservation stands
    limiter.failing = False
    world.guard.settle(identity, 100)  # spent: a retry does not apply twice
    assert world.used()["daily"] == 500


class PlainLimiter:
    """A custom rate store written before settling existed (no QuotaAdjuster)."""

    def __init__(self, clock: FakeClock) -> None:
        self.inner = MemoryRateStore(clock=clock)
        self.hit, self.peek, self.release = self.inner.hit, self.inner.peek, self.inner.release
        self.reset, self.close = self.inner.reset, self.inner.close
        self.ahit, self.apeek, self.arelease = (
            self.inner.ahit,
            self.inner.apeek,
            self.inner.arelease,
        )
        self.areset, self.aclose = self.inner.areset, self.inner.aclose


def test_limiter_without_adjust_warns(clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    """A limiter that cannot settle is logged and counted, never a crash."""
    limiter = PlainLimiter(clock)
    assert not isinstance(limiter, QuotaAdjuster)
    world = World(limiter, clock)
    identity = world.admit(cost=5)
    with caplog.at_level(logging.WARNING, logger="keyguard"):
        world.guard.settle(identity, 1)
        asyncio.run(world.guard.asettle(identity, 1))
    assert "cannot settle" in caplog.text
    assert world.telemetry.errors == ["limits"]


# -- the async face, on a store that does I/O ---------------------------------------


@pytest.fixture
def sqlite_world(clock: FakeClock, tmp_path: Path) -> World:
    return World(SQLiteRateStore(tmp_path / "rl.db", clock=clock), clock)


async def test_asettle_from_another_task(sqlite_world: World) -> None:
    """asettle in a task of its own (the stream's end) settles, once, among rivals."""
    assert not sqlite_world.guard.inline
    identity = await sqlite_world.aadmit(cost=500)
    await asyncio.gather(*(sqlite_world.guard.asettle(identity, 200) for _ in range(8)))
    assert sqlite_world.used()["daily"] == 200


async def test_asettle_survives_cancellation(sqlite_world: World) -> None:
    """A task cancelled while settling still settles, then sees its cancellation."""
    identity = await sqlite_world.aadmit(cost=500)
    task = asyncio.create_task(sqlite_world.guard.asettle(identity, 0))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sqlite_world.used()["daily"] == 0


async def test_asettle_storage_error(clock: FakeClock, tmp_path: Path) -> None:
    """On the async face too, a failing store is counted, not raised."""

    class Failing(SQLiteRateStore):
        async def aadjust(self, adjustment: Adjustment) -> None:
            raise StorageError("down")

    world = World(Failing(tmp_path / "rl.db", clock=clock), clock)
    identity = await world.aadmit(cost=5)
    await world.guard.asettle(identity, 1)
    assert world.telemetry.errors == ["limits"]


# -- the property -------------------------------------------------------------------

_STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("reserve"), st.integers(0, 300)),
        st.tuples(st.just("settle"), st.integers(0, 400)),
        st.tuples(st.just("tomorrow"), st.just(0)),
    ),
    max_size=40,
)


class Admitted:
    """The model of one admission: its day and month, and what each quota counts of it."""

    def __init__(self, identity: Identity, day: str, month: str, units: int) -> None:
        self.identity, self.day, self.month = identity, day, month
        self.daily = self.monthly = units


@settings(max_examples=150, deadline=None)
@given(steps=_STEPS, rng=st.randoms(use_true_random=False))
def test_property_settling_counts_what_was_used(
    steps: list[tuple[str, int]], rng: random.Random
) -> None:
    """Whatever the order of reservations, settlements (repeated, late) and UTC day
    rollovers, each quota counts exactly its period's admissions: what was used for
    those settled within the period, what was reserved for the rest. So settling never
    leaves a quota counting more than was used, and a refund never gives back more
    than was charged (nothing counts below what the period's admissions used)."""
    clock = FakeClock(START)
    world = World(MemoryRateStore(clock=clock), clock)
    admitted: list[Admitted] = []
    for op, n in steps:
        day = clock.datetime().strftime("%Y-%m-%d")
        if op == "reserve":
            decision = world.guard.check(req(world.secret), cost=n)
            if isinstance(decision, Allow) and decision.identity is not None:
                admitted.append(Admitted(decision.identity, day, day[:7], n))
        elif op == "settle" and admitted:
            one = rng.choice(admitted)
            assert one.identity.charge is not None
            first = not one.identity.charge.spent
            world.guard.settle(one.identity, n)
            if first and one.day == day:
                one.daily = n
            if first and one.month == day[:7]:
                one.monthly = n
        elif op == "tomorrow":
            clock.advance(86_400)
            world.guard.check(req(world.secret), cost=0)  # a hit drops the past day
        day = clock.datetime().strftime("%Y-%m-%d")
        daily = sum(a.daily for a in admitted if a.day == day)
        monthly = sum(a.monthly for a in admitted if a.month == day[:7])
        counted = world.used()
        assert counted["daily"] == min(daily, 1000)
        assert counted["monthly"] == min(monthly, 10_000)
