"""Rate limits held in the process: exact for one process, bounded in memory.

Each hit runs :func:`keyguard.windows.decide` on the bucket's state, in place, under
one lock, so the threads of a WSGI server and the tasks of an event loop see exact
counts. Nothing blocks on I/O, so the async methods simply call through. Windows and
leases run on the monotonic clock, so stepping the wall clock neither resets nor
locks anyone out; quotas follow the wall clock's UTC calendar.

Memory is bounded without a background thread: idle buckets expire lazily, found
through a heap of the times at which they go idle. A hit only moves a bucket's idle
time later and leaves the heap alone: a row that comes up early is pushed again at
the bucket's idle time then, so the heap takes one row per bucket, not one per hit.
When ``max_entries`` live buckets exist, a new bucket is refused
(``denied_by.name == "capacity"``) rather than evicting a live counter, which would
hand an attacker who floods the table a fresh limit.
"""

from __future__ import annotations

import heapq
import threading
from collections.abc import Sequence
from typing import Any, ClassVar

from .._state import to_ms
from ..clock import Clock, SystemClock
from ..errors import ConfigurationError
from ..limiting import Adjustment, Admission, HitRequest, LimitKind, LimitPolicy, LimitState
from ..windows import (
    DEFAULT_LEASE_TTL,
    DEFAULT_SLOTS,
    Bucket,
    Now,
    Tuning,
    adjust_quotas,
    decide,
    idle_at,
    inspect,
    prune,
    release,
)

__all__ = ["CAPACITY", "MemoryRateStore"]

CAPACITY = "capacity"
# Expired buckets dropped per call in passing, so expiry keeps up without a sweep.
_EXPIRE_PER_CALL = 8
_ALLOWED = Admission(True, ())


class _Entry(Bucket):
    """A bucket with the tick (ms) of its current row in the idle heap: rows with any
    other time are stale, and ``queued <= idle`` always."""

    __slots__ = ("queued",)

    def __init__(self) -> None:
        super().__init__()
        self.queued = 0


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

    in_process: ClassVar[bool] = True  # never blocks: async callers may call the sync face

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
        self._idle: list[tuple[int, str]] = []  # heap of (tick in ms, bucket)

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

    def __contains__(self, bucket: object) -> bool:
        """Whether ``bucket`` holds any state: a lock-free hint, exact only under the lock.

        Lets a caller skip :meth:`peek` for buckets that were never hit, such as the
        client addresses that never failed to authenticate.
        """
        return bucket in self._entries

    # sync face

    def hit(self, request: HitRequest) -> Admission:
        if request.policy.is_empty():
            return _ALLOWED
        with self._lock:
            clock = self._clock
            now = Now(clock.monotonic(), clock.now())
            if self._idle and self._idle[0][0] <= round(now.tick * 1000):  # to_ms, inlined
                self._expire(now, _EXPIRE_PER_CALL)
            entry = self._entries.get(request.bucket)
            if entry is not None:
                admission = decide(entry, request, now, self._tuning)
                if not admission.allowed and entry.is_empty():
                    del self._entries[request.bucket]  # its heap row is now stale
                return admission
            entry = _Entry()
            admission = decide(entry, request, now, self._tuning)
            if entry.is_empty():
                return admission
            if not self._room(now):
                return self._full(request.policy, now)
            self._entries[request.bucket] = entry
            self._queue(request.bucket, entry)
            if len(self._idle) > 2 * len(self._entries) + 1024:
                self._compact()
        return admission

    def release(self, bucket: str, lease: str) -> None:
        with self._lock:
            entry = self._entries.get(bucket)
            if entry is not None and release(entry, lease) and entry.is_empty():
                del self._entries[bucket]

    def adjust(self, adjustment: Adjustment) -> None:
        """Settle quota counters under the lock (see :class:`~keyguard.limiting.Adjustment`).

        A charge to a bucket that holds nothing (it expired, or reserved 0 units) starts
        one, unless the table is full of live buckets: then the charge is dropped
        rather than evicting a live counter, the same trade as a hit's.
        """
        if not adjustment.delta or not adjustment.charges:
            return
        with self._lock:
            now = Now(self._clock.monotonic(), self._clock.now())
            bucket = adjustment.bucket
            entry = self._entries.get(bucket)
            if entry is not None:
                adjust_quotas(entry, adjustment, now)  # its heap row may now come up early
                if entry.is_empty():
                    del self._entries[bucket]
                return
            entry = _Entry()
            if adjust_quotas(entry, adjustment, now) and self._room(now):
                self._entries[bucket] = entry
                self._queue(bucket, entry)

    def peek(self, bucket: str, policy: LimitPolicy) -> Sequence[LimitState]:
        with self._lock:
            entry = self._entries.get(bucket)
            now = Now(self._clock.monotonic(), self._clock.now())
            return inspect(Bucket() if entry is None else entry, policy, now)

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

    async def aadjust(self, adjustment: Adjustment) -> None:
        self.adjust(adjustment)

    async def areset(self, bucket: str) -> None:
        self.reset(bucket)

    async def aclose(self) -> None:
        self.close()

    # bookkeeping, always under the lock

    def _queue(self, bucket: str, entry: _Entry) -> None:
        """Give ``entry`` its (new) heap row, at its idle time."""
        entry.queued = entry.idle
        heapq.heappush(self._idle, (entry.idle, bucket))

    def _compact(self) -> None:
        """Rebuild the heap with one row per bucket, dropping the stale rows."""
        for entry in self._entries.values():
            entry.queued = entry.idle
        self._idle = [(e.idle, b) for b, e in self._entries.items()]
        heapq.heapify(self._idle)

    def _current(self, when: int, bucket: str) -> _Entry | None:
        """The entry a heap row stands for, or ``None`` for a stale row."""
        entry = self._entries.get(bucket)
        return entry if entry is not None and entry.queued == when else None

    def _expire(self, now: Now, budget: int | None) -> None:
        """Drop buckets whose idle time has come (at most ``budget`` heap rows)."""
        heap, t = self._idle, to_ms(now.tick)
        while heap and heap[0][0] <= t and (budget is None or budget > 0):
            if budget is not None:
                budget -= 1
            when, bucket = heapq.heappop(heap)
            entry = self._current(when, bucket)
            if entry is None:
                continue
            if entry.idle <= t:
                # Re-checked on both clocks: a wall-clock step may have moved a quota period.
                prune(entry, now)
                if entry.is_empty():
                    del self._entries[bucket]
                    continue
                entry.idle = max(t + 1, to_ms(idle_at(entry, now)))  # later, so the loop ends
            self._queue(bucket, entry)

    def _room(self, now: Now) -> bool:
        if len(self._entries) < self._max:
            return True
        self._expire(now, None)
        return len(self._entries) < self._max

    def _full(self, policy: LimitPolicy, now: Now) -> Admission:
        """A refusal for a new bucket while the table is full of live ones."""
        heap = self._idle
        while heap:  # bring the first row up to date, so the wait it gives is true
            when, bucket = heap[0]
            entry = self._current(when, bucket)
            if entry is None:
                heapq.heappop(heap)
            elif entry.idle > when:
                entry.queued = entry.idle
                heapq.heapreplace(heap, (entry.idle, bucket))
            else:
                break
        wait = max(0.001, (heap[0][0] - to_ms(now.tick)) / 1000) if heap else 1.0
        # LimitKind has no "capacity" kind yet; a window is the nearest meaning.
        full = LimitState(CAPACITY, LimitKind.WINDOW, self._max, 0, wait)
        states = (*inspect(Bucket(), policy, now), full)
        return Admission(False, states, denied_by=full, retry_after=wait)
