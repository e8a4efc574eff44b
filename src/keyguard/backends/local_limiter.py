"""Windows and the concurrency cap in this process's memory, quotas in a SQLite file.

The embedded default (a SQLite storage URL and no ``limiter_url``) runs as one process
on one machine. There a window or an in-flight slot may start again from zero when
the process restarts (it lasts seconds to a day), but a month's quota must not: so
windows and the cap are counted in a :class:`MemoryRateStore` (no write transaction,
no thread), and quotas in a :class:`SQLiteRateStore` on the key file. A request whose
limits have no quota never touches the file.

A request with quotas takes two steps, quotas first:

1. its quotas alone are charged in the file (one transaction); a refusal there is the
   answer, and no window is taken;
2. its windows and cap are taken in memory; if they refuse, the units just charged
   are given back (an :class:`~keyguard.limiting.Adjustment` of exactly those
   counters, in the periods they were charged).

So a refused request consumes nothing, and nothing is ever over-admitted: an admission
passed both stores. **The price is a brief under-admission race**: between step 1 and
the refund, another request of the same key sees the units taken and may be refused by
a quota it would have fitted. It needs a quota near its limit and a window refusing the
same key at that moment. A refund that cannot be written is logged and leaves the
units charged, so a storage failure under-admits too.

Only one process may count a file's windows in memory, or each would enforce a limit
of its own: :func:`keyguard.configure.build_guard` takes a lock beside the file
(:mod:`keyguard.backends._process_lock`) before it uses this store.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import ClassVar

from ..decisions import quota_charges
from ..errors import StorageError
from ..limiting import (
    Adjustment,
    Admission,
    HitRequest,
    LimitKind,
    LimitPolicy,
    LimitState,
)
from .memory_limiter import MemoryRateStore
from .sqlite_limiter import SQLiteRateStore

__all__ = ["LocalWindowsRateStore", "quota_charges"]

_logger = logging.getLogger("keyguard")
_MAX_SPLITS = 4096


class _Split:
    """A policy with quotas, cut in two: ``quotas`` for the file, ``rest`` (windows and
    the cap, ``None`` when there are none) for memory. Built once per policy."""

    __slots__ = ("quotas", "rest", "windows")

    def __init__(self, policy: LimitPolicy) -> None:
        if any(w.seconds < 1 for w in policy.windows):
            # Checked here, before step 1 charges anything (memory would refuse it after).
            raise ValueError("a window must last at least one second")
        self.quotas = LimitPolicy(quotas=policy.quotas)
        rest = LimitPolicy(windows=policy.windows, concurrency=policy.concurrency)
        self.rest = None if rest.is_empty() else rest
        self.windows = len(policy.windows)

    def merged(
        self, rest: Sequence[LimitState], quotas: Sequence[LimitState]
    ) -> tuple[LimitState, ...]:
        """States in the order every store gives them: windows, quotas, then the cap."""
        n = self.windows
        return (*rest[:n], *quotas, *rest[n:])


def _wait(state: LimitState) -> float | None:
    """How long a full window or cap from a peek refuses (``None``: waiting cannot help)."""
    if state.kind is LimitKind.CONCURRENCY and state.limit < 1:
        return None
    return state.reset_after


class LocalWindowsRateStore:
    """A :class:`~keyguard.limiting.RateBackend` and ``QuotaAdjuster``: windows and the
    concurrency cap in ``windows``, quotas in ``quotas`` (see the module for why, and
    for the one race it accepts).

    :param windows: counts windows and in-flight slots (exact for one process).
    :param quotas: counts daily and monthly units, so a restart keeps them.

    Closing this store closes both. The async face calls the memory store directly,
    and the SQLite store through its own async face (a worker thread); a request with
    no quota never leaves the event loop.

    .. versionadded:: 0.1
    """

    # For the guard (keyguard._guard_support): every async method is the sync one, or
    # that sync one in a worker thread, so the guard may run a whole check in one
    # thread hop (none at all when hit_now answers); and arelease only calls memory,
    # so it never suspends.
    threaded: ClassVar[bool] = True
    queues_releases: ClassVar[bool] = True

    def __init__(self, windows: MemoryRateStore, quotas: SQLiteRateStore) -> None:
        self.windows = windows
        self.quotas = quotas
        self._hit_windows = windows.hit  # bound once: the hot path is this one call
        self._splits: dict[int, tuple[LimitPolicy, _Split]] = {}

    def __repr__(self) -> str:
        return f"LocalWindowsRateStore(windows={self.windows!r}, quotas={self.quotas!r})"

    def _split(self, policy: LimitPolicy) -> _Split:
        """The policy's :class:`_Split`, cached by identity as :mod:`keyguard.windows`
        caches plans (the entry holds the policy, so its id stays its own)."""
        found = self._splits.get(id(policy))
        if found is not None and found[0] is policy:
            return found[1]
        split = _Split(policy)
        if len(self._splits) >= _MAX_SPLITS:
            self._splits.clear()
        self._splits[id(policy)] = (policy, split)
        return split

    # the steps both faces share

    @staticmethod
    def _check(request: HitRequest) -> None:
        # Memory would raise this too, but only after the quotas were charged.
        if request.policy.concurrency is not None and request.lease is None:
            raise ValueError("a policy with a concurrency cap needs a lease id on each hit")

    def _quota_refusal(self, request: HitRequest, split: _Split, refused: Admission) -> Admission:
        """The quotas' refusal, with the windows and cap as they stand (nothing taken),
        refused by whichever refusing limit waits longest, as a single store answers."""
        if split.rest is None:
            return refused
        rest = self.windows.peek(request.bucket, split.rest)
        denied_by, retry = refused.denied_by, refused.retry_after
        for state in rest:
            if retry is None:
                break  # waiting cannot help the quota: nothing waits longer
            if state.remaining <= 0:
                wait = _wait(state)
                if wait is None or wait > retry:
                    denied_by, retry = state, wait
        return Admission(False, split.merged(rest, refused.states), denied_by, retry)

    def _windows_hit(self, request: HitRequest, split: _Split) -> Admission:
        rest = split.rest
        if rest is None:
            return Admission(True, ())
        return self._hit_windows(HitRequest(request.bucket, rest, request.cost, request.lease))

    def _refund(self, request: HitRequest, split: _Split, charged: Admission) -> Adjustment | None:
        """What gives back the units step 1 charged (``None`` when it charged none)."""
        if not request.cost:
            return None
        wall = self.quotas.clock.now()
        charges = quota_charges(split.quotas, charged.states, wall)
        return Adjustment(request.bucket, charges, -request.cost)

    def _answer(
        self, request: HitRequest, split: _Split, charged: Admission, taken: Admission
    ) -> Admission:
        if taken.allowed:
            return Admission(True, split.merged(taken.states, charged.states))
        # The quotas' states as they stand once the refund is in: before this charge.
        cost = request.cost
        quotas = [s._replace(remaining=s.remaining + cost) for s in charged.states]
        return Admission(
            False, split.merged(taken.states, quotas), taken.denied_by, taken.retry_after
        )

    @staticmethod
    def _refund_failed(exc: StorageError) -> None:
        # The type only: a message may name a bucket. The units stay charged (under-admits).
        _logger.warning("keyguard could not give back quota units: %s", type(exc).__name__)

    # sync face

    def hit(self, request: HitRequest) -> Admission:
        if not request.policy.quotas:
            return self._hit_windows(request)
        self._check(request)
        split = self._split(request.policy)
        charged = self.quotas.hit(HitRequest(request.bucket, split.quotas, request.cost))
        if not charged.allowed:
            return self._quota_refusal(request, split, charged)
        try:
            taken = self._windows_hit(request, split)
        except BaseException:
            self._give_back(self._refund(request, split, charged))
            raise
        if not taken.allowed:
            self._give_back(self._refund(request, split, charged))
        return self._answer(request, split, charged, taken)

    def hit_now(self, request: HitRequest) -> Admission | None:
        """:meth:`hit` when it needs no I/O (no quota: memory alone), else ``None``
        with nothing taken: the guard then takes the hit in a worker thread."""
        if request.policy.quotas:
            return None
        return self._hit_windows(request)

    def _give_back(self, refund: Adjustment | None) -> None:
        if refund is not None:
            try:
                self.quotas.adjust(refund)
            except StorageError as exc:
                self._refund_failed(exc)

    def release(self, bucket: str, lease: str) -> None:
        self.windows.release(bucket, lease)

    def adjust(self, adjustment: Adjustment) -> None:
        """Settle quota counters in the file (windows count requests, never units)."""
        self.quotas.adjust(adjustment)

    def peek(self, bucket: str, policy: LimitPolicy) -> Sequence[LimitState]:
        if not policy.quotas:
            return self.windows.peek(bucket, policy)
        split = self._split(policy)
        quotas = self.quotas.peek(bucket, split.quotas)
        if split.rest is None:
            return quotas
        return split.merged(self.windows.peek(bucket, split.rest), quotas)

    def reset(self, bucket: str) -> None:
        self.windows.reset(bucket)
        self.quotas.reset(bucket)

    def close(self) -> None:
        try:
            self.windows.close()
        finally:
            self.quotas.close()

    # async face: memory is called directly, the file through its own async face

    async def ahit(self, request: HitRequest) -> Admission:
        if not request.policy.quotas:
            return self._hit_windows(request)
        self._check(request)
        split = self._split(request.policy)
        charged = await self.quotas.ahit(HitRequest(request.bucket, split.quotas, request.cost))
        if not charged.allowed:
            return self._quota_refusal(request, split, charged)
        try:
            taken = self._windows_hit(request, split)
        except BaseException:
            await self._agive_back(self._refund(request, split, charged))
            raise
        if not taken.allowed:
            await self._agive_back(self._refund(request, split, charged))
        return self._answer(request, split, charged, taken)

    async def _agive_back(self, refund: Adjustment | None) -> None:
        if refund is not None:
            try:
                await self.quotas.aadjust(refund)
            except StorageError as exc:
                self._refund_failed(exc)

    async def arelease(self, bucket: str, lease: str) -> None:
        """Free a slot in memory: never suspends (see ``queues_releases``)."""
        self.windows.release(bucket, lease)

    async def aadjust(self, adjustment: Adjustment) -> None:
        await self.quotas.aadjust(adjustment)

    async def apeek(self, bucket: str, policy: LimitPolicy) -> Sequence[LimitState]:
        if not policy.quotas:
            return self.windows.peek(bucket, policy)
        split = self._split(policy)
        quotas = await self.quotas.apeek(bucket, split.quotas)
        if split.rest is None:
            return quotas
        return split.merged(self.windows.peek(bucket, split.rest), quotas)

    async def areset(self, bucket: str) -> None:
        self.windows.reset(bucket)
        await self.quotas.areset(bucket)

    async def aclose(self) -> None:
        try:
            self.windows.close()
        finally:
            await self.quotas.aclose()
