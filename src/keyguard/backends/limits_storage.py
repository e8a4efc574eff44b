"""Rate limits on any storage the ``limits`` library knows (memcached, MongoDB, ...).

**Not atomic across limits.** ``limits`` checks and takes one window at a time, so a
hit here reads every window and quota, then takes each in turn. Under concurrency,
two requests can both pass the check and both be counted (a window it takes itself
atomically, as memcached and the moving window do, refuses the loser; quota counters
are checked, then incremented, and can overshoot), and a request refused by a later
window may already have been charged by an earlier one. Use SQLite (one machine) or
Redis (one Lua script) when exact counts matter. A team would still use this backend
to keep its limits in a storage it already runs and operates, when a rare
over-admission under a burst is acceptable.

Windows use a ``limits`` strategy (moving window by default, exact per window; or the
cheaper sliding-window counter) and run on the storage's own clock. Quotas are
fixed-window counters keyed by the UTC day or month, read from the injected clock.
Concurrency slots live in this process (an in-process :class:`MemoryRateStore`),
because ``limits`` has no leases: with several workers, each caps its own requests.
``limits``' own ``memory://`` storage starts a timer thread; it suits tests, while one
process is better served by :class:`MemoryRateStore` itself.

**Settling reserved units** (:meth:`LimitsRateStore.adjust`) uses the one atomic
counter operation ``limits`` offers every storage, ``incr``. A quota counter's key
names its period, so a refund after a rollover cannot reach the new period's counter.
A refund is an ``incr`` by a negative amount (or the storage's own ``decr``, which
stops at zero, where it has one); when a refund meets a counter that holds less than
the refund (it was reset meanwhile), the counter can dip below zero until a second
``incr`` brings it back: for that instant it reads as more remaining than the limit.
Storages whose ``incr`` takes no negative amount (memcached) cannot refund at all:
the refund raises :class:`StorageError` (the guard logs it), while extra charges work.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal, NamedTuple
from urllib.parse import quote

from limits import RateLimitItemPerSecond
from limits.errors import ConfigurationError as LimitsConfigurationError
from limits.errors import StorageError as LimitsStorageError
from limits.storage import Storage, storage_from_string
from limits.strategies import MovingWindowRateLimiter, SlidingWindowCounterRateLimiter

from ..clock import Clock, SystemClock
from ..errors import ConfigurationError, StorageError
from ..limiting import (
    Adjustment,
    Admission,
    HitRequest,
    LimitKind,
    LimitPolicy,
    LimitState,
    Quota,
    Window,
)
from ..windows import DEFAULT_LEASE_TTL, current_period
from .memory_limiter import MemoryRateStore

__all__ = ["LimitsRateStore"]

Strategy = Literal["moving-window", "sliding-window-counter"]
_STRATEGIES = {
    "moving-window": MovingWindowRateLimiter,
    "sliding-window-counter": SlidingWindowCounterRateLimiter,
}
_MAX_SHAPES = 1024  # limit shapes remembered for reset(); policies are few
_QUOTA_MARGIN = 3600  # seconds a quota counter outlives its period, for clock skew


class _QuotaRead(NamedTuple):
    """A quota as read before a hit: its state, the wait before the cost fits, its
    counter's key and the seconds that counter must live."""

    state: LimitState
    retry: float | None
    key: str
    ttl: int


def _part(text: str) -> str:
    return quote(text, safe="")  # no "/" left, so two identifiers cannot run together


def _slowest(
    refusals: Sequence[tuple[LimitState, float | None]],
) -> tuple[LimitState, float | None]:
    return max(refusals, key=lambda r: math.inf if r[1] is None else r[1])


class LimitsRateStore:
    """A :class:`~keyguard.limiting.RateStore` over a ``limits`` storage; see the module
    docstring for what it does not guarantee.

    :param storage: a sync ``limits`` storage, e.g. ``storage_from_string("memcached://...")``.
    :param strategy: ``"moving-window"`` (exact per window) or ``"sliding-window-counter"``.
    :param clock: wall time for quota periods, monotonic time for concurrency leases.
    :param lease_ttl: seconds a concurrency slot is held if never released.
    :param namespace: the prefix of every key written to the storage.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        storage: Storage,
        *,
        strategy: Strategy = "moving-window",
        clock: Clock | None = None,
        lease_ttl: float = DEFAULT_LEASE_TTL,
        namespace: str = "kg",
    ) -> None:
        if not isinstance(storage, Storage):
            raise ConfigurationError("LimitsRateStore needs a sync limits storage")
        if strategy not in _STRATEGIES:
            raise ConfigurationError(f"strategy must be one of {sorted(_STRATEGIES)}")
        try:
            self._limiter = _STRATEGIES[strategy](storage)
        except NotImplementedError as exc:
            raise ConfigurationError(f"this limits storage cannot run {strategy}") from exc
        self._storage = storage
        # limits' Storage has no decr; where a storage has one, a refund stops at zero.
        decr = getattr(storage, "decr", None)
        self._decr: Callable[[str, int], object] | None = decr if callable(decr) else None
        base = storage.base_exceptions
        self._errors: tuple[type[Exception], ...] = (
            LimitsStorageError,
            *(base if isinstance(base, tuple) else (base,)),
        )
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._slots = MemoryRateStore(clock=self._clock, lease_ttl=lease_ttl)
        self._ns = namespace
        self._shapes: set[Window | Quota] = set()

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        strategy: Strategy = "moving-window",
        clock: Clock | None = None,
        lease_ttl: float = DEFAULT_LEASE_TTL,
        **options: Any,
    ) -> LimitsRateStore:
        """A store on ``limits.storage.storage_from_string(url, **options)``."""
        if url.startswith("async+"):
            raise ConfigurationError("use the sync limits URL; the async face runs in a thread")
        try:
            storage = storage_from_string(url, wrap_exceptions=True, **options)
        except LimitsConfigurationError as exc:
            raise ConfigurationError(f"limits cannot open this storage URL: {exc}") from None
        if not isinstance(storage, Storage):
            raise ConfigurationError("use the sync limits URL; the async face runs in a thread")
        return cls(storage, strategy=strategy, clock=clock, lease_ttl=lease_ttl)

    def __repr__(self) -> str:
        return f"LimitsRateStore({type(self._storage).__name__})"

    @contextmanager
    def _storage_errors(self, action: str) -> Iterator[None]:
        try:
            yield
        except self._errors as exc:
            raise StorageError(f"the limits storage could not {action}") from exc

    # keys

    def _item(self, window: Window, bucket: str) -> tuple[RateLimitItemPerSecond, str, str]:
        self._remember(window)
        item = RateLimitItemPerSecond(window.limit, window.seconds, namespace=self._ns)
        return item, _part(window.scope), _part(bucket)

    def _quota_key(self, quota: Quota, bucket: str, period: str) -> str:
        self._remember(quota)
        return f"{self._ns}q/{_part(quota.scope)}/{_part(bucket)}/{period}"

    def _remember(self, shape: Window | Quota) -> None:
        if len(self._shapes) < _MAX_SHAPES:
            self._shapes.add(shape)

    # reading

    def _window(self, window: Window, bucket: str) -> tuple[LimitState, float | None]:
        """The window's state and, if it is full, how long until it admits."""
        stats = self._limiter.get_window_stats(*self._item(window, bucket))
        reset = max(0.0, stats.reset_time - time.time())  # the storage keeps its own time
        state = LimitState(
            window.name, LimitKind.WINDOW, window.limit, stats.remaining, reset, window.seconds
        )
        return state, reset if window.limit >= 1 else None

    def _quota(self, quota: Quota, bucket: str, cost: int) -> _QuotaRead:
        wall = self._clock.now()
        period, start, end = current_period(wall, quota.period)
        key = self._quota_key(quota, bucket, period)
        used = self._storage.get(key)
        reset = max(0.0, end - wall)
        remaining = max(0, quota.limit - used)
        state = LimitState(
            quota.name, LimitKind.QUOTA, quota.limit, remaining, reset, round(end - start)
        )
        return _QuotaRead(state, None if cost > quota.limit else reset, key, math.ceil(reset))

    # sync face

    def hit(self, request: HitRequest) -> Admission:
        """Check every limit, then take each (see the module docstring: not atomic)."""
        if request.cost < 0:
            raise ValueError("a hit's cost must be a whole number >= 0")
        if request.policy.concurrency is not None and request.lease is None:
            raise ValueError("a policy with a concurrency cap needs a lease id on each hit")
        with self._storage_errors("count a hit"):
            return self._hit(request)

    def _hit(self, request: HitRequest) -> Admission:
        policy, bucket = request.policy, request.bucket
        windows = [self._window(w, bucket) for w in policy.windows]
        quotas = [self._quota(q, bucket, request.cost) for q in policy.quotas]
        refused = [(s, r) for s, r in windows if s.remaining < 1]
        refused += [(q.state, q.retry) for q in quotas if q.state.remaining < request.cost]
        states = [s for s, _ in windows] + [q.state for q in quotas]
        if policy.concurrency is not None:
            cap = LimitPolicy(concurrency=policy.concurrency)
            if refused:  # report the cap too, but take no slot
                states += self._slots.peek(bucket, cap)
            else:
                slot = self._slots.hit(HitRequest(bucket, cap, lease=request.lease))
                states += slot.states
                if slot.denied_by is not None:
                    refused.append((slot.denied_by, slot.retry_after))
        if refused:
            denied, retry = _slowest(refused)
            return Admission(False, tuple(states), denied_by=denied, retry_after=retry)
        try:
            return self._take(request, windows, quotas, states)
        except BaseException:
            # The storage failed after the slot was taken: nobody holds a lease to give
            # it back, so give it back here rather than leave the key "full" for a TTL.
            if request.lease is not None:
                self._slots.release(bucket, request.lease)
            raise

    def _take(
        self,
        request: HitRequest,
        windows: list[tuple[LimitState, float | None]],
        quotas: list[_QuotaRead],
        states: list[LimitState],
    ) -> Admission:
        for window, (state, retry) in zip(request.policy.windows, windows, strict=True):
            if not self._limiter.hit(*self._item(window, request.bucket)):
                # Lost a race for the window's last request; earlier windows stay charged.
                if request.lease is not None:
                    self._slots.release(request.bucket, request.lease)
                full = LimitState(
                    state.name, state.kind, state.limit, 0, state.reset_after, state.window_seconds
                )
                return Admission(False, tuple(states), denied_by=full, retry_after=retry)
        # Quotas of one shape (period and scope) share a counter: charged once.
        ttls = {quota.key: quota.ttl for quota in quotas} if request.cost else {}
        for key, ttl in ttls.items():
            self._storage.incr(key, ttl + _QUOTA_MARGIN, amount=request.cost)
        return Admission(True, tuple(_charged(s, request.cost) for s in states))

    def release(self, bucket: str, lease: str) -> None:
        self._slots.release(bucket, lease)

    def adjust(self, adjustment: Adjustment) -> None:
        """Settle quota counters, one ``incr`` each (see the module docstring)."""
        delta = adjustment.delta
        if isinstance(delta, bool) or not isinstance(delta, int):
            raise ValueError("an adjustment's delta must be a whole number")
        if not delta:
            return
        wall, seen = self._clock.now(), set()
        with self._storage_errors("adjust a quota"):
            for charge in adjustment.charges:
                period, _, end = current_period(wall, charge.period)
                shape = (charge.period, charge.scope)
                if shape in seen or period != charge.period_id:
                    continue  # shared counters move once; a past period stays as it was
                seen.add(shape)
                key = f"{self._ns}q/{_part(charge.scope)}/{_part(adjustment.bucket)}/{period}"
                self._move(key, delta, math.ceil(max(0.0, end - wall)) + _QUOTA_MARGIN)

    def _move(self, key: str, delta: int, ttl: int) -> None:
        storage = self._storage
        if delta < 0 and self._decr is not None:
            self._decr(key, -delta)  # stops at zero, atomically
            return
        if delta < 0 and not storage.get(key):
            return  # nothing charged any more (expired or reset): nothing to give back
        total = storage.incr(key, ttl, amount=delta)
        if total < 0:  # the counter held less than the refund: back to zero
            storage.incr(key, ttl, amount=-total)

    def peek(self, bucket: str, policy: LimitPolicy) -> Sequence[LimitState]:
        with self._storage_errors("read a bucket"):
            states = [self._window(w, bucket)[0] for w in policy.windows]
            states += [self._quota(q, bucket, 0).state for q in policy.quotas]
        if policy.concurrency is not None:
            states += self._slots.peek(bucket, LimitPolicy(concurrency=policy.concurrency))
        return states

    def reset(self, bucket: str) -> None:
        """Clear the bucket's counters for every limit this store has used."""
        wall = self._clock.now()
        with self._storage_errors("reset a bucket"):
            for shape in list(self._shapes):
                if isinstance(shape, Window):
                    self._limiter.clear(*self._item(shape, bucket))
                else:
                    self._storage.clear(
                        self._quota_key(shape, bucket, current_period(wall, shape.period)[0])
                    )
        self._slots.reset(bucket)

    def close(self) -> None:
        self._slots.close()

    # async face: limits' sync storage, run in a worker thread

    async def ahit(self, request: HitRequest) -> Admission:
        return await asyncio.to_thread(self.hit, request)

    async def arelease(self, bucket: str, lease: str) -> None:
        self.release(bucket, lease)  # in-process only: nothing to wait for

    async def apeek(self, bucket: str, policy: LimitPolicy) -> Sequence[LimitState]:
        return await asyncio.to_thread(self.peek, bucket, policy)

    async def aadjust(self, adjustment: Adjustment) -> None:
        await asyncio.to_thread(self.adjust, adjustment)

    async def areset(self, bucket: str) -> None:
        await asyncio.to_thread(self.reset, bucket)

    async def aclose(self) -> None:
        self.close()


def _charged(state: LimitState, cost: int) -> LimitState:
    """A window's or quota's state read before the hit, with the hit counted."""
    if state.kind is LimitKind.CONCURRENCY:
        return state  # already the state after taking the slot
    reset = state.reset_after
    if state.kind is LimitKind.WINDOW and not reset:
        reset = float(state.window_seconds or 0)  # this hit is now the oldest in the window
    used = 1 if state.kind is LimitKind.WINDOW else cost
    remaining = max(0, state.remaining - used)
    return LimitState(state.name, state.kind, state.limit, remaining, reset, state.window_seconds)
