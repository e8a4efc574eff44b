"""Rate limits held in the process: exact for one process, bounded in memory.

Each hit runs :func:`keyguard.windows.evaluate` under one lock, so the threads of a
WSGI server and the tasks of an event loop see exact counts. Nothing blocks on I/O,
so the async methods simply call through. Windows and leases run on the monotonic
clock, so stepping the wall clock neither resets nor locks anyone out; quotas follow
the wall clock's UTC calendar.

Memory is bounded without a background thread: idle buckets expire lazily, found
through a heap of the times at which they go idle. When ``max_entries`` live buckets
exist, a new bucket is refused (``denied_by.name == "capacity"``) rather than evicting
a live counter, which would hand an attacker who floods the table a fresh limit.
"""

from __future__ import annotations

import heapq
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..clock import Clock, SystemClock
from ..errors import ConfigurationError
from ..limiting import Admission, HitRequest, LimitKind, LimitPolicy, LimitState
from ..windows import (
    DEFAULT_LEASE_TTL,
    DEFAULT_SLOTS,
    EMPTY,
    BucketState,
    Now,
    Tuning,
    evaluate,
    idle_at,
    inspect,
    prune,
    release,
)

__all__ = ["CAPACITY", "MemoryRateStore"]

CAPACITY = "capacity"
# Expired buckets dropped per call in passing, so expiry keeps up without a sweep.
_EXPIRE_PER_CALL = 8


@dataclass(frozen=True, slots=True)
class _Entry:
    state: BucketState
    idle_at: float  # monotonic seconds after which the state holds nothing live


class MemoryRateStore:
    """A :class:`~keyguard.limiting.RateStore` and ``AsyncRateStore`` in one process.

    :param clock: the time source (monotonic for windows and leases, wall for quotas).
    :param max_entries: the most buckets held at once; when all are live, hits on a new
        bucket are refused until one goes idle (never evicted while it counts).
    :param lease_ttl: seconds a concurrency slot is held if never released.
    :param slots: slots per window (precision against memory).

    Limits are per process: with several workers each enforces its own.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        *,
        clock: Clock | None = None,
        max_entries: int = 100_000,
        lease_ttl: float = DEFAULT_LEASE_TTL,
        slots: int = DEFAULT_SLOTS,
    ) -> None:
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise ConfigurationError("max_entries must be a whole number >= 1")
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._max = max_entries
        self._tuning = Tuning(slots, lease_ttl)
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._idle: list[tuple[float, str]] = []  # heap; stale rows are skipped

    @classmethod
    def from_url(cls, url: str, **options: Any) -> MemoryRateStore:
        """``memory://``: every call gives a new, empty store."""
        if url.rstrip("/") != "memory:":
            raise ConfigurationError("a memory URL takes nothing after memory://")
        return cls(**options)

    def __repr__(self) -> str:
        return f"MemoryRateStore(buckets={len(self._entries)}, max_entries={self._max})"

    def __len__(self) -> int:
        """How many buckets are held now (live, or idle and not yet dropped)."""
        return len(self._entries)

    def _now(self) -> Now:
        return Now(self._clock.monotonic(), self._clock.now())

    # sync face

    def hit(self, request: HitRequest) -> Admission:
        if request.policy.is_empty():
            return Admission(True, ())
        with self._lock:
            now = self._now()
            self._expire(now, _EXPIRE_PER_CALL)
            entry = self._entries.get(request.bucket)
            admission, state = evaluate(
                EMPTY if entry is None else entry.state, request, now, self._tuning
            )
            if entry is None and not state.is_empty() and not self._room(now):
                return self._full(request.policy, now)
            self._put(request.bucket, state, now)
        return admission

    def release(self, bucket: str, lease: str) -> None:
        with self._lock:
            entry = self._entries.get(bucket)
            if entry is not None:
                now = self._now()
                self._put(bucket, release(entry.state, lease, now), now)

    def peek(self, bucket: str, policy: LimitPolicy) -> Sequence[LimitState]:
        with self._lock:
            entry = self._entries.get(bucket)
            return inspect(
                EMPTY if entry is None else entry.state, policy, self._now(), self._tuning
            )

    def reset(self, bucket: str) -> None:
        with self._lock:
            self._entries.pop(bucket, None)

    def close(self) -> None:
        with self._lock:
            self._entries.clear()
            self._idle.clear()

    # async face: nothing here waits on I/O

    async def ahit(self, request: HitRequest) -> Admission:
        return self.hit(request)

    async def arelease(self, bucket: str, lease: str) -> None:
        self.release(bucket, lease)

    async def apeek(self, bucket: str, policy: LimitPolicy) -> Sequence[LimitState]:
        return self.peek(bucket, policy)

    async def areset(self, bucket: str) -> None:
        self.reset(bucket)

    async def aclose(self) -> None:
        self.close()

    # bookkeeping, always under the lock

    def _put(self, bucket: str, state: BucketState, now: Now) -> None:
        if state.is_empty():
            self._entries.pop(bucket, None)
            return
        old = self._entries.get(bucket)
        when = idle_at(state, now)
        self._entries[bucket] = _Entry(state, when)
        # Idle times only move later on a hit; a release leaves an older, later row.
        if old is None or when > old.idle_at:
            heapq.heappush(self._idle, (when, bucket))
            if len(self._idle) > 2 * len(self._entries) + 1024:
                self._idle = [(e.idle_at, b) for b, e in self._entries.items()]
                heapq.heapify(self._idle)

    def _expire(self, now: Now, budget: int | None) -> None:
        """Drop buckets whose idle time has come (at most ``budget`` heap rows)."""
        heap = self._idle
        while heap and heap[0][0] <= now.tick and (budget is None or budget > 0):
            if budget is not None:
                budget -= 1
            _, bucket = heapq.heappop(heap)
            entry = self._entries.get(bucket)
            if entry is None or entry.idle_at > now.tick:
                continue  # a stale row: the bucket was reset, or hit since
            # Re-checked on both clocks: a wall-clock step may have moved a quota period.
            live = prune(entry.state, now)
            if live.is_empty():
                del self._entries[bucket]
            else:
                when = idle_at(live, now)  # always later than now, so the loop ends
                self._entries[bucket] = _Entry(live, when)
                heapq.heappush(heap, (when, bucket))

    def _room(self, now: Now) -> bool:
        if len(self._entries) < self._max:
            return True
        self._expire(now, None)
        return len(self._entries) < self._max

    def _full(self, policy: LimitPolicy, now: Now) -> Admission:
        """A refusal for a new bucket while the table is full of live ones."""
        wait = max(0.001, self._idle[0][0] - now.tick) if self._idle else 1.0
        # LimitKind has no "capacity" kind yet; a window is the nearest meaning.
        full = LimitState(CAPACITY, LimitKind.WINDOW, self._max, 0, wait)
        states = (*inspect(EMPTY, policy, now, self._tuning), full)
        return Admission(False, states, denied_by=full, retry_after=wait)
