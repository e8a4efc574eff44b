"""What the guard decides: the values adapters act on and apps read.

Kept apart from :mod:`keyguard.guard` so that adapters and user code can import the
result types without the decision machinery.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeAlias

from ._slots import slot_setters
from ._state import period_at
from .denials import Denial
from .limiting import Adjustment, LimitKind, LimitPolicy, LimitState, QuotaCharge

__all__ = ["Allow", "Charge", "Decision", "Headers", "Identity", "Lease", "quota_charges"]

Headers: TypeAlias = tuple[tuple[bytes, bytes], ...]


def quota_charges(
    policy: LimitPolicy, states: Sequence[LimitState], at: float
) -> tuple[QuotaCharge, ...]:
    """The quota counters an admission of ``policy`` charged, read from its ``states``.

    A backend reports a quota's period as ``reset_after`` (seconds to its end, on the
    backend's clock) and its length; the middle of the period, placed at ``at`` (this
    process's clock at the admission), names it whatever the skew, up to half a day.
    """
    quotas = [s for s in states if s.kind is LimitKind.QUOTA]
    return tuple(
        QuotaCharge(
            quota.period,
            quota.scope,
            period_at(at + state.reset_after - (state.window_seconds or 0) / 2, quota.period).key,
        )
        for quota, state in zip(policy.quotas, quotas, strict=False)
    )


class Charge:
    """What one admission charged to its quotas: the handle :meth:`Guard.settle` takes.

    Immutable, except that it can be *spent* once: :meth:`spend` answers ``True`` to
    exactly one caller, whatever thread or task it runs on (a non-blocking lock
    acquire is one atomic step), so a settlement applies once however often an app
    calls it. Copies (``copy``, ``deepcopy``, ``dataclasses.replace`` of the identity)
    share the handle, and with it the one settlement. Built by the guard on every
    admission that charged a quota, so it only stores what it was given; the quota
    periods are worked out when it is settled.

    .. versionadded:: 0.1
    """

    __slots__ = ("_adding", "_at", "_policy", "_spent", "_states", "bucket", "settled", "units")

    def __init__(
        self,
        bucket: str,
        policy: LimitPolicy,
        states: tuple[LimitState, ...],
        units: int,
        wall: float,
    ) -> None:
        self.bucket = bucket
        self.units = units
        self._policy, self._states, self._at = policy, states, wall
        self._spent = threading.Lock()
        self._adding = threading.Lock()
        self.settled: int | None = None  # the units it was settled to, once it is

    def spend(self) -> bool:
        """Whether this call is the one that settles (``True`` once, then ``False``)."""
        return self._spent.acquire(blocking=False)

    @property
    def quotas(self) -> LimitPolicy:
        """The quotas the admission charged, as a policy of quotas alone."""
        return LimitPolicy(quotas=self._policy.quotas)

    def add(self, units: int) -> bool:
        """Count ``units`` more as reserved (:meth:`Guard.reserve`); ``False`` once the
        charge is settled, when nothing more may be added to it."""
        with self._adding:
            if self.spent:
                return False
            self.units += units
            return True

    @property
    def spent(self) -> bool:
        return self._spent.locked()

    def charges(self) -> tuple[QuotaCharge, ...]:
        """Each quota counter the admission charged, with the period it charged.

        A backend reports a quota's period as ``reset_after`` (seconds to its end, on
        the backend's clock) and its length; the middle of the period, placed on this
        process's clock at the admission, names it whatever the skew, up to half a day.
        """
        return quota_charges(self._policy, self._states, self._at)

    def adjustment(self, used: int) -> Adjustment:
        """Settle to ``used`` units: give back, or charge, the difference."""
        return Adjustment(self.bucket, self.charges(), used - self.units)

    def __copy__(self) -> Charge:
        return self

    def __deepcopy__(self, memo: object) -> Charge:
        return self

    def units_used(self) -> int:
        """What the request cost: the units it was settled to, else those reserved."""
        return self.units if self.settled is None else self.settled

    def __repr__(self) -> str:  # no policy internals
        return f"Charge(units={self.units}, spent={self.spent})"


@dataclass(frozen=True, slots=True)
class Identity:
    """Who made an allowed request: published to the app, never holding the secret.

    ``units`` is what the admission charged the key's quotas (the ``cost`` the app
    passed, or the service's cost); ``charge`` is the handle
    :meth:`~keyguard.guard.Guard.settle` takes to settle them to the real count, or
    ``None`` when nothing was charged to a quota (no quotas, no limiter, or a
    limiter that failed open).
    """

    key_id: str
    name: str
    owner: str | None
    scopes: tuple[str, ...]
    plan: str
    limits: tuple[LimitState, ...]
    client_ip: str | None
    auth_method: str
    service: str | None = None
    units: int = 0
    charge: Charge | None = field(default=None, repr=False, compare=False)


_KEY_ID, _NAME, _OWNER, _SCOPES, _PLAN, _LIMITS, _CLIENT_IP, _METHOD, _SERVICE, _UNITS, _CHARGE = (
    slot_setters(Identity)
)


def identity_of(
    *,
    key_id: str,
    name: str,
    owner: str | None,
    scopes: tuple[str, ...],
    plan: str,
    limits: tuple[LimitState, ...],
    client_ip: str | None,
    auth_method: str,
    service: str | None,
    units: int,
    charge: Charge | None,
) -> Identity:
    """``Identity(...)`` for the guard, once per allowed request, at a third of its cost.

    A frozen dataclass's ``__init__`` sets each field through ``object.__setattr__``
    (1.6 us for these eleven); the slots' own setters take 0.7 us. Every field is given.
    """
    identity = object.__new__(Identity)
    _KEY_ID(identity, key_id)
    _NAME(identity, name)
    _OWNER(identity, owner)
    _SCOPES(identity, scopes)
    _PLAN(identity, plan)
    _LIMITS(identity, limits)
    _CLIENT_IP(identity, client_ip)
    _METHOD(identity, auth_method)
    _SERVICE(identity, service)
    _UNITS(identity, units)
    _CHARGE(identity, charge)
    return identity


@dataclass(frozen=True, slots=True)
class Lease:
    """A concurrency slot to give back when the response ends."""

    bucket: str
    lease_id: str


@dataclass(frozen=True, slots=True)
class Allow:
    """Let the request through; ``identity`` is ``None`` on a public path."""

    identity: Identity | None
    headers: Headers = ()
    lease: Lease | None = None
    cost: int = 0


Decision: TypeAlias = Allow | Denial
_IDENTITY, _HEADERS, _LEASE, _COST = slot_setters(Allow)


def allow_of(identity: Identity | None, headers: Headers, lease: Lease | None, cost: int) -> Allow:
    """``Allow(...)`` for the guard, once per allowed request (see :mod:`._slots`)."""
    allow = object.__new__(Allow)
    _IDENTITY(allow, identity)
    _HEADERS(allow, headers)
    _LEASE(allow, lease)
    _COST(allow, cost)
    return allow
