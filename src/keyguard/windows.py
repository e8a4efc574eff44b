"""The arithmetic of windows, quotas and concurrency slots, written once for every backend.

Pure: no I/O and no clock reads. A backend holds a mutable :class:`Bucket` per key and
calls :func:`decide` with the time it read, inside its own atomic step (a lock, a
transaction): the memory backend keeps its buckets in a dict, the SQLite one loads a
bucket from its JSON row and writes it back when :attr:`Bucket.dirty` says it changed.
:func:`decide` checks every limit without charging (it only drops what expired, which
changes no answer) and charges them all only if all admit, so a refusal costs nothing.

**Windows** slide: a window of ``W`` seconds counts requests in slots of
``max(1, W // slots)`` seconds, and a request at ``t`` is admitted only if fewer than
``limit`` requests sit in the slots that may still hold one from ``(t - W, t]`` (the
oldest, partly expired slot counts whole). So no half-open interval of ``W`` seconds
ever holds more than ``limit`` admitted requests, times taken to the millisecond, and a
window costs O(slots) memory whatever its limit. **Quotas** count units per UTC day
(``YYYY-MM-DD``) or month (``YYYY-MM``). **Concurrency** slots are leases with an
expiry, so a crashed worker's slots come back after the lease TTL.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from limits import parse_many

from ._state import (
    Bucket,
    Counter,
    Now,
    Period,
    Usage,
    current_period,
    idle_at,
    period_at,
    prune,
    to_ms,
)
from .errors import ConfigurationError, shown
from .limiting import (
    Adjustment,
    Admission,
    HitRequest,
    LimitKind,
    LimitPolicy,
    LimitState,
    Quota,
    QuotaPeriod,
    Window,
)

__all__ = [
    "CONCURRENCY_RETRY",
    "DEFAULT_LEASE_TTL",
    "DEFAULT_SLOTS",
    "DEFAULT_TUNING",
    "Bucket",
    "Counter",
    "Now",
    "Period",
    "Tuning",
    "Usage",
    "adjust_quotas",
    "current_period",
    "decide",
    "idle_at",
    "inspect",
    "policy_from_strings",
    "prune",
    "release",
]

DEFAULT_SLOTS = 60
# Nothing renews a lease, so the TTL bounds both a crash (a dead worker's slots stay
# taken this long) and the longest request that keeps its slot: two minutes covers
# most streamed AI responses while a crash costs a key at most two minutes at "full".
DEFAULT_LEASE_TTL = 120.0
# In-flight requests end when they end; a refused caller is told to try again soon.
CONCURRENCY_RETRY = 1.0
CONCURRENCY = "concurrency"
_NAME = re.compile(r"[a-z0-9-]{1,64}")
_WINDOW, _QUOTA, _SLOTS = LimitKind.WINDOW, LimitKind.QUOTA, LimitKind.CONCURRENCY
_RETRY_MS = 1000  # CONCURRENCY_RETRY in milliseconds
_new = tuple.__new__  # builds a named tuple at half the cost of calling its class


@dataclass(frozen=True, slots=True)
class Tuning:
    """Per-store settings: slots per window and the lease TTL in seconds."""

    slots: int = DEFAULT_SLOTS
    lease_ttl: float = DEFAULT_LEASE_TTL
    lease_ms: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.slots, bool) or not isinstance(self.slots, int) or self.slots < 1:
            raise ConfigurationError(f"slots must be a whole number >= 1, not {shown(self.slots)}")
        if not isinstance(self.lease_ttl, int | float) or not 0 < self.lease_ttl <= 86_400:
            raise ConfigurationError(
                f"lease_ttl must be seconds in (0, 86400], not {shown(self.lease_ttl)}"
            )
        object.__setattr__(self, "lease_ms", to_ms(self.lease_ttl))


DEFAULT_TUNING = Tuning()


# -- policies, compiled once ------------------------------------------------------------


class _Plan:
    """A policy's lookups, precomputed: the limits in the order their states are shown,
    and each shared counter (``counted``, ``charged``) once."""

    __slots__ = ("cap", "charged", "counted", "quotas", "windows")

    def __init__(self, policy: LimitPolicy) -> None:
        if any(w.seconds < 1 for w in policy.windows):
            raise ValueError("a window must last at least one second")
        self.windows = tuple(
            (f"{w.seconds}:{w.scope}", w.name, w.limit, w.seconds) for w in policy.windows
        )
        self.counted = tuple({key: s for key, _, _, s in self.windows}.items())
        self.quotas = tuple(
            (f"{q.period.value}:{q.scope}", q.name, q.limit, q.period) for q in policy.quotas
        )
        self.charged = tuple({key: p for key, _, _, p in self.quotas}.items())
        self.cap = policy.concurrency


# By identity: policies are few and long-lived (keyguard.plans caches up to 4096), and
# hashing a frozen policy costs more than the lookup saves. The entry holds the policy,
# so its id stays its own while cached.
_PLANS: dict[int, tuple[LimitPolicy, _Plan]] = {}
_MAX_PLANS = 4096


def _plan(policy: LimitPolicy) -> _Plan:
    found = _PLANS.get(id(policy))
    if found is not None and found[0] is policy:
        return found[1]
    plan = _Plan(policy)
    if len(_PLANS) >= _MAX_PLANS:
        _PLANS.clear()
    _PLANS[id(policy)] = (policy, plan)
    return plan


# -- the checks -------------------------------------------------------------------------


def _if_charged(  # noqa: PLR0912 - one flat pass: the hot path of every hit
    bucket: Bucket, plan: _Plan, request: HitRequest, t: int, wall: float, *, slots: int
) -> tuple[LimitState, ...] | None:
    """Every limit's state with this hit charged, or ``None`` if one limit refuses it.

    The hot path: checks that find nothing expired are inlined, and states are built
    without the named tuple's (Python-level) ``__new__``.
    """
    cost, lease = request.cost, request.lease
    windows, states = bucket.windows, []
    for key, name, limit, seconds in plan.windows:
        counter = windows.get(key)
        if counter is not None:
            keys, width = counter.keys, counter.width  # never empty while stored
            if keys[0] * width <= t - counter.span or (keys[-1] - 1) * width >= t:
                counter = bucket.live_counter(key, t)  # a slot left, or is from the future
        if counter is None:
            if limit < 1:
                return None
            width = max(1, seconds // slots) * 1000
            used, end = 0, -(-t // width) * width + seconds * 1000
        else:
            used = counter.total
            if used >= limit:
                return None
            end = counter.keys[0] * counter.width + counter.span
        left, reset = limit - used - 1, (end - t) / 1000
        states.append(_new(LimitState, (name, _WINDOW, limit, left, reset, seconds)))
    quotas = bucket.quotas
    for key, name, limit, kind in plan.quotas:
        usage = quotas.get(key)
        if usage is not None and wall < usage.period.end:
            period, used = usage.period, usage.used
        else:
            bucket.live_usage(key, wall)  # drops a past period
            period, used = period_at(wall, kind), 0
        if used + cost > limit:
            return None
        left, reset = limit - used - cost, period.end - wall
        states.append(_new(LimitState, (name, _QUOTA, limit, left, reset, period.length)))
    cap = plan.cap
    if cap is not None:
        leases = bucket.leases
        if leases and bucket.lease_min <= t:
            leases = bucket.live_leases(t)
        taken = len(leases) + (lease not in leases)
        if taken > cap:
            return None
        reset = min(_RETRY_MS, min(leases.values()) - t) / 1000 if taken >= cap and leases else 0.0
        states.append(_new(LimitState, (CONCURRENCY, _SLOTS, cap, cap - taken, reset, None)))
    return tuple(states)


def _window_retry(counter: Counter | None, limit: int, t: int) -> int | None:
    """The smallest wait after which one more request fits: shed the oldest slots."""
    if limit < 1 or counter is None:
        return None
    excess, shed = counter.total + 1 - limit, 0
    for k, n in zip(counter.keys, counter.counts, strict=True):
        shed += n
        if shed >= excess:
            return k * counter.width + counter.span - t
    return 0


_Verdict = tuple[LimitState, bool, int | None]  # state uncharged, admits, wait (ms)


def _verdicts(
    bucket: Bucket, plan: _Plan, t: int, wall: float, *, cost: int = 0, lease: str | None = None
) -> list[_Verdict]:
    """Every limit's state with nothing charged, whether it admits the hit, and the wait
    (ms) until it would (``None`` when waiting cannot help)."""
    verdicts: list[_Verdict] = []
    for key, name, limit, seconds in plan.windows:
        counter = bucket.live_counter(key, t)
        used = 0 if counter is None else counter.total
        reset = 0.0 if counter is None else (counter.keys[0] * counter.width + counter.span - t)
        ok = used < limit
        retry = None if ok else _window_retry(counter, limit, t)
        state = LimitState(name, _WINDOW, limit, max(0, limit - used), reset / 1000, seconds)
        verdicts.append((state, ok, retry))
    for key, name, limit, kind in plan.quotas:
        usage = bucket.live_usage(key, wall)
        period, used = (period_at(wall, kind), 0) if usage is None else (usage.period, usage.used)
        reset = max(0.0, period.end - wall)
        state = LimitState(name, _QUOTA, limit, max(0, limit - used), reset, period.length)
        verdicts.append((state, used + cost <= limit, None if cost > limit else to_ms(reset)))
    cap = plan.cap
    if cap is not None:
        leases = bucket.live_leases(t)
        held = len(leases)
        wait = min(_RETRY_MS, min(leases.values()) - t) if held >= cap and leases else 0
        ok = held + (lease not in leases) <= cap
        state = LimitState(CONCURRENCY, _SLOTS, cap, max(0, cap - held), wait / 1000)
        verdicts.append((state, ok, None if ok or cap < 1 else wait))
    return verdicts


# -- the decisions ----------------------------------------------------------------------


def _charge(
    bucket: Bucket, plan: _Plan, request: HitRequest, t: int, wall: float, *, tuning: Tuning
) -> None:
    """Count the hit (every counter is live, as :func:`_if_charged` left it); limits of
    one shape share a counter, charged once. ``idle`` only ever moves later."""
    cost, lease = request.cost, request.lease
    windows, idle = bucket.windows, bucket.idle
    for key, seconds in plan.counted:
        counter = windows.get(key)
        if counter is None:
            width = max(1, seconds // tuning.slots) * 1000
            counter = windows[key] = Counter(seconds * 1000, width)
        keys, width = counter.keys, counter.width
        k = -(-t // width)  # the slot of t: ((k - 1) * width, k * width]
        if keys and keys[-1] == k:
            counter.counts[-1] += 1
        else:
            keys.append(k)
            counter.counts.append(1)
        counter.total += 1
        idle = max(idle, k * width + counter.span)
    if cost:
        quotas = bucket.quotas
        for key, kind in plan.charged:
            usage = quotas.get(key)
            if usage is not None:
                usage.used += cost
                continue
            usage = quotas[key] = Usage(period_at(wall, kind), cost)
            # Once a period: a wall-clock step since only makes expiry re-check it.
            idle = max(idle, t + round((usage.period.end - wall) * 1000))
    if plan.cap is not None and lease is not None:
        end = t + tuning.lease_ms
        if not bucket.leases or end < bucket.lease_min:
            bucket.lease_min = end
        bucket.leases[lease] = end
        idle = max(idle, end)
    bucket.idle = idle
    bucket.dirty = True


def decide(
    bucket: Bucket, request: HitRequest, now: Now, tuning: Tuning = DEFAULT_TUNING
) -> Admission:
    """Check every limit of ``request`` and, only if all admit, charge them all to ``bucket``.

    A refusal charges nothing (it may drop what expired); its ``retry_after`` is the
    longest wait among the refusing limits (``None`` when one of them can never admit
    this request), so a retry exactly that much later passes.

    :raises ValueError: for a negative cost, a cap without a lease, a window under 1 s.
    """
    plan = _plan(request.policy)
    cost, lease = request.cost, request.lease
    if (type(cost) is not int or cost < 0) and (
        isinstance(cost, bool) or not isinstance(cost, int) or cost < 0
    ):
        raise ValueError("a hit's cost must be a whole number >= 0")
    if plan.cap is not None and lease is None:
        raise ValueError("a policy with a concurrency cap needs a lease id on each hit")
    t, wall = to_ms(now.tick), now.wall
    states = _if_charged(bucket, plan, request, t, wall, slots=tuning.slots)
    if states is not None:
        _charge(bucket, plan, request, t, wall, tuning=tuning)
        return _new(Admission, (True, states, None, None))
    verdicts = _verdicts(bucket, plan, t, wall, cost=cost, lease=lease)
    worst = max(
        (v for v in verdicts if not v[1]), key=lambda v: float("inf") if v[2] is None else v[2]
    )
    retry = None if worst[2] is None else worst[2] / 1000
    return Admission(False, tuple(v[0] for v in verdicts), worst[0], retry)


def inspect(bucket: Bucket, policy: LimitPolicy, now: Now) -> tuple[LimitState, ...]:
    """Where every limit of ``policy`` stands; nothing is charged (a backend's peek)."""
    verdicts = _verdicts(bucket, _plan(policy), to_ms(now.tick), now.wall)
    return tuple(v[0] for v in verdicts)


def release(bucket: Bucket, lease: str) -> bool:
    """Free ``lease``; says whether it was held (an unknown lease changes nothing)."""
    if bucket.leases.pop(lease, None) is None:
        return False
    bucket.dirty = True
    return True


def adjust_quotas(bucket: Bucket, adjustment: Adjustment, now: Now) -> bool:
    """Settle ``bucket``'s quota counters by ``adjustment.delta``; says whether one changed.

    A counter moves only while the period its admission charged is the current one
    (by ``now.wall``), so a refund after a UTC rollover never credits the new period
    and a late charge never bills it. A refund stops at zero; a charge never refuses
    and may take a counter past its limit. A charge to a counter that holds nothing
    (a reservation of 0 units) starts it. Counters shared by quotas of one shape move
    once. ``idle`` only ever moves later, as in :func:`decide`.

    :raises ValueError: for a delta that is not a whole number.
    """
    delta = adjustment.delta
    if isinstance(delta, bool) or not isinstance(delta, int):
        raise ValueError("an adjustment's delta must be a whole number")
    changed, seen, wall = False, set(), now.wall
    for charge in adjustment.charges if delta else ():
        key = f"{charge.period.value}:{charge.scope}"
        period = period_at(wall, charge.period)
        if key in seen or period.key != charge.period_id:
            continue
        seen.add(key)
        usage = bucket.live_usage(key, wall)
        if usage is None and delta > 0:
            usage = bucket.quotas[key] = Usage(period, 0)
            bucket.idle = max(bucket.idle, to_ms(now.tick) + to_ms(period.end - wall))
        if usage is not None and usage.period.key == period.key:  # not a later period
            usage.used = max(0, usage.used + delta)
            changed = bucket.dirty = True
    return changed


# -- configuration ----------------------------------------------------------------------


def _windows(rate: str, scope: str) -> list[Window]:
    try:
        items = parse_many(rate)
    except ValueError as exc:
        raise ConfigurationError(f"rate limit {shown(rate)} is not a limits string") from exc
    windows = []
    for item in items:
        if item.amount < 1:
            raise ConfigurationError(f"rate limit {shown(rate)} has a limit below 1")
        name = item.GRANULARITY.name
        name = name if item.multiples == 1 else f"{item.multiples}-{name}"
        windows.append(Window(name, item.amount, item.get_expiry(), scope))
    return windows


def _positive(what: str, value: int | None) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigurationError(f"{what} must be a whole number >= 1, not {shown(value)}")
    return value


def _unique(names: Iterable[str]) -> None:
    seen: set[str] = set()
    for name in names:
        if not _NAME.fullmatch(name) or name in seen:
            raise ConfigurationError(f"limit name {shown(name)} is repeated or not [a-z0-9-]")
        seen.add(name)


def policy_from_strings(
    rate: str | None,
    quota_daily: int | None = None,
    quota_monthly: int | None = None,
    concurrency: int | None = None,
    scope: str = "",
) -> LimitPolicy:
    """A policy from settings: ``"60/minute;1000/hour"``, daily and monthly units, a cap.

    Windows are named after their period (``minute``, ``10-second``), quotas ``daily``
    and ``monthly``. Called at start-up, so every mistake is a
    :class:`ConfigurationError` naming the bad value.
    """
    windows = _windows(rate, scope) if rate is not None and rate.strip() else []
    quotas = [
        Quota(name, limit, period, scope)
        for name, period, value in (
            ("daily", QuotaPeriod.DAY, quota_daily),
            ("monthly", QuotaPeriod.MONTH, quota_monthly),
        )
        if (limit := _positive(f"quota_{name}", value)) is not None
    ]
    _unique([*(w.name for w in windows), *(q.name for q in quotas)])
    return LimitPolicy(tuple(windows), tuple(quotas), _positive("concurrency", concurrency))
