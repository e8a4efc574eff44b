"""What a limit is, what a limiter answers, and the contract every limiter backend keeps.

A request asks for one :class:`HitRequest`: every window, quota and the concurrency
slot of its key (and of its key and service, through ``scope``) are checked and taken
together in one atomic backend call, so when one refuses, nothing is consumed. An
admission that reserved units (say ``max_tokens``) is later settled to what was really
used by one :class:`Adjustment`: units given back to, or charged further to, the
quota counters the admission charged, in the period it charged them.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol, runtime_checkable

from ._slots import slot_setters

__all__ = [
    "Adjustment",
    "Admission",
    "AsyncRateStore",
    "HitRequest",
    "LimitKind",
    "LimitPolicy",
    "LimitState",
    "Quota",
    "QuotaAdjuster",
    "QuotaCharge",
    "QuotaPeriod",
    "RateBackend",
    "RateStore",
    "Window",
]


class LimitKind(enum.StrEnum):
    WINDOW = "window"
    QUOTA = "quota"
    CONCURRENCY = "concurrency"


class QuotaPeriod(enum.StrEnum):
    """Quotas reset at UTC calendar boundaries."""

    DAY = "day"
    MONTH = "month"


@dataclass(frozen=True, slots=True)
class Window:
    """At most ``limit`` requests in any ``seconds``-long interval (sliding).

    ``name`` is the policy name shown in ``RateLimit-Policy`` (e.g. ``minute``);
    ``scope`` separates counters that share a key, e.g. ``svc:image`` for a
    per-service window; the empty scope is the key's own.
    """

    name: str
    limit: int
    seconds: int
    scope: str = ""


@dataclass(frozen=True, slots=True)
class Quota:
    """At most ``limit`` units per UTC day or month."""

    name: str
    limit: int
    period: QuotaPeriod
    scope: str = ""


@dataclass(frozen=True, slots=True)
class LimitPolicy:
    """Every limit that applies to one request."""

    windows: tuple[Window, ...] = ()
    quotas: tuple[Quota, ...] = ()
    concurrency: int | None = None

    def is_empty(self) -> bool:
        return not self.windows and not self.quotas and self.concurrency is None


@dataclass(frozen=True, slots=True)
class HitRequest:
    """One admission: ``bucket`` is the key id, ``cost`` the units quotas are charged.

    Windows count requests (one per hit); quotas count units. ``lease`` names the
    concurrency slot to take (a per-request id) when the policy caps concurrency.
    """

    bucket: str
    policy: LimitPolicy
    cost: int = 1
    lease: str | None = None


_BUCKET, _POLICY, _COST, _LEASE = slot_setters(HitRequest)


def hit_request(bucket: str, policy: LimitPolicy, cost: int, lease: str | None) -> HitRequest:
    """``HitRequest(...)`` for the guard, once per admission (see :mod:`._slots`)."""
    request = object.__new__(HitRequest)
    _BUCKET(request, bucket)
    _POLICY(request, policy)
    _COST(request, cost)
    _LEASE(request, lease)
    return request


@dataclass(frozen=True, slots=True)
class QuotaCharge:
    """One quota counter an admission charged: its period kind, scope and period id.

    ``period_id`` is the UTC day (``YYYY-MM-DD``) or month (``YYYY-MM``) the units went
    to, so an adjustment made after the period rolled over can tell the counter now in
    use is another one.
    """

    period: QuotaPeriod
    scope: str
    period_id: str


@dataclass(frozen=True, slots=True)
class Adjustment:
    """Units to give back to (``delta < 0``) or charge further to (``delta > 0``) the
    quota counters of ``bucket`` that one admission charged.

    A backend applies it atomically and **never refuses**: a charge may leave a quota
    above its limit (its ``remaining`` then reads 0), a refund never takes a counter
    below zero. Each counter is adjusted only while ``period_id`` is still its current
    period: a refund after the day or month rolled over must not credit the new one,
    and a late charge does not bill it either. Windows count requests, not units, so
    they are never adjusted. Counters shared by several quotas of one shape (same
    period and scope) are adjusted once.
    """

    bucket: str
    charges: tuple[QuotaCharge, ...]
    delta: int


class LimitState(NamedTuple):
    """Where one limit stands after (or instead of) a hit.

    ``reset_after`` is the number of seconds until the capacity consumed now is
    available again (for a window: until the oldest counted requests leave it). A
    named tuple, not a dataclass, because every hit builds one per limit.
    """

    name: str
    kind: LimitKind
    limit: int
    remaining: int
    reset_after: float
    window_seconds: int | None = None


class Admission(NamedTuple):
    """A limiter's answer.

    ``retry_after`` is ``None`` on a refusal that waiting cannot cure (a cost larger
    than the limit itself). A named tuple, as cheap to build as :class:`LimitState`.
    """

    allowed: bool
    states: tuple[LimitState, ...]
    denied_by: LimitState | None = None
    retry_after: float | None = None


@runtime_checkable
class RateStore(Protocol):
    """Checks and takes every limit of a request in one atomic step."""

    def hit(self, request: HitRequest) -> Admission: ...

    def release(self, bucket: str, lease: str) -> None:
        """Free a concurrency slot; releasing twice, or an unknown lease, is harmless."""
        ...

    def peek(self, bucket: str, policy: LimitPolicy) -> Sequence[LimitState]:
        """The current state of every limit, consuming nothing."""
        ...

    def reset(self, bucket: str) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class AsyncRateStore(Protocol):
    """The async face of :class:`RateStore`."""

    async def ahit(self, request: HitRequest) -> Admission: ...

    async def arelease(self, bucket: str, lease: str) -> None: ...

    async def apeek(self, bucket: str, policy: LimitPolicy) -> Sequence[LimitState]: ...

    async def areset(self, bucket: str) -> None: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class RateBackend(RateStore, AsyncRateStore, Protocol):
    """A rate store with both faces, as every built-in limiter is."""


@runtime_checkable
class QuotaAdjuster(Protocol):
    """The optional ability to settle reserved units, in both faces.

    A capability of its own, as STYLE item 4 asks, so a custom rate store written
    before it keeps working (without settlement); every built-in limiter has it. The
    guard checks for it with ``isinstance`` before it settles.

    .. versionadded:: 0.1
    """

    def adjust(self, adjustment: Adjustment) -> None:
        """Apply ``adjustment`` atomically; never refuses (see :class:`Adjustment`)."""
        ...

    async def aadjust(self, adjustment: Adjustment) -> None: ...
