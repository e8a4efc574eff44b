"""The arithmetic of windows, quotas and concurrency slots, written once for every backend.

Pure: no I/O and no clock reads. A backend loads a bucket's :class:`BucketState`,
calls :func:`evaluate` with the time it read, and stores the state it gets back, all
inside its own atomic step (a lock, a transaction); the memory backend keeps the
states in a dict, the SQLite one stores them as JSON, one row per bucket.

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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime

from limits import parse_many

from .clock import from_timestamp
from .errors import ConfigurationError, shown
from .limiting import (
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
    "EMPTY",
    "BucketState",
    "Counter",
    "Now",
    "Tuning",
    "Usage",
    "current_period",
    "evaluate",
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


@dataclass(frozen=True, slots=True)
class Now:
    """The time of one decision, as the backend read it.

    ``tick`` drives windows and leases (monotonic in one process, wall time when
    processes share the state); ``wall`` places quotas in the UTC calendar.
    """

    tick: float
    wall: float


@dataclass(frozen=True, slots=True)
class Tuning:
    """Per-store settings: slots per window and the lease TTL in seconds."""

    slots: int = DEFAULT_SLOTS
    lease_ttl: float = DEFAULT_LEASE_TTL

    def __post_init__(self) -> None:
        if isinstance(self.slots, bool) or not isinstance(self.slots, int) or self.slots < 1:
            raise ConfigurationError(f"slots must be a whole number >= 1, not {shown(self.slots)}")
        if not isinstance(self.lease_ttl, int | float) or not 0 < self.lease_ttl <= 86_400:
            raise ConfigurationError(
                f"lease_ttl must be seconds in (0, 86400], not {shown(self.lease_ttl)}"
            )


@dataclass(frozen=True, slots=True)
class Counter:
    """One window's requests: ``(k, n)`` pairs, oldest first, in milliseconds.

    Slot ``k`` holds the ``n`` requests made in ``((k - 1) * width, k * width]``.
    """

    span: int
    width: int
    slots: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True, slots=True)
class Usage:
    """Units used in one quota period (``YYYY-MM-DD`` or ``YYYY-MM``, UTC)."""

    period: str
    used: int


@dataclass(frozen=True, slots=True)
class BucketState:
    """Everything counted for one bucket; immutable, so a refusal can return it as is.

    Keys: windows ``"<seconds>:<scope>"``, quotas ``"<day|month>:<scope>"`` (so limits
    of the same shape share a counter, and a renamed or re-limited window keeps its
    count); leases map a lease id to its expiry tick in milliseconds.
    """

    windows: Mapping[str, Counter] = field(default_factory=dict)
    quotas: Mapping[str, Usage] = field(default_factory=dict)
    leases: Mapping[str, int] = field(default_factory=dict)

    def is_empty(self) -> bool:
        return not (self.windows or self.quotas or self.leases)


EMPTY = BucketState()
DEFAULT_TUNING = Tuning()


@dataclass(frozen=True, slots=True)
class _Check:
    """One limit's verdict: its state if nothing is charged and if the hit is charged."""

    ok: bool
    retry: int | None  # ms until it would admit; None when waiting cannot help
    before: LimitState
    after: LimitState


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


def _slot(t: int, width: int) -> int:
    return -(-t // width)


# -- quotas: the UTC calendar -------------------------------------------------------


def current_period(wall: float, period: QuotaPeriod) -> tuple[str, float, float]:
    """The UTC day or month holding ``wall``: its id, start and end (epoch seconds)."""
    period_id = _period_id(wall, period)
    return (period_id, *_period_bounds(period_id))


def _period_id(wall: float, period: QuotaPeriod) -> str:
    text = from_timestamp(wall).date().isoformat()
    return text if period is QuotaPeriod.DAY else text[:7]


def _period_bounds(period_id: str) -> tuple[float, float]:
    """Start and end (epoch seconds) of a day or month id."""
    if len(period_id) == 7:
        start = date.fromisoformat(period_id + "-01")
        end = date(start.year + start.month // 12, start.month % 12 + 1, 1)
    else:
        start = date.fromisoformat(period_id)
        end = date.fromordinal(start.toordinal() + 1)
    first, last = (datetime(d.year, d.month, d.day, tzinfo=UTC).timestamp() for d in (start, end))
    return first, last


def _quota_key(quota: Quota) -> str:
    return f"{quota.period.value}:{quota.scope}"


def _window_key(window: Window) -> str:
    return f"{window.seconds}:{window.scope}"


# -- pruning ------------------------------------------------------------------------


def _prune_counter(counter: Counter, t: int) -> Counter:
    """Drop slots that left the window; fold slots from the future (a clock stepped
    back) into the current one, so a step neither forgets requests nor locks out."""
    now_slot = _slot(t, counter.width)
    floor = t - counter.span
    kept: list[tuple[int, int]] = []
    future = 0
    for k, n in counter.slots:
        if k > now_slot:
            future += n
        elif k * counter.width > floor:
            kept.append((k, n))
    if future:
        if kept and kept[-1][0] == now_slot:
            kept[-1] = (now_slot, kept[-1][1] + future)
        else:
            kept.append((now_slot, future))
    return Counter(counter.span, counter.width, tuple(kept))


def prune(state: BucketState, now: Now) -> BucketState:
    """The state without anything expired: empty slots, past periods, dead leases."""
    t = _ms(now.tick)
    windows = {}
    for key, counter in state.windows.items():
        live = _prune_counter(counter, t)
        if live.slots:
            windows[key] = live
    quotas = {
        key: usage
        for key, usage in state.quotas.items()
        if usage.used > 0
        and usage.period >= _period_id(now.wall, QuotaPeriod(key[: key.index(":")]))
    }
    leases = {lease: expiry for lease, expiry in state.leases.items() if expiry > t}
    return BucketState(windows, quotas, leases)


def idle_at(state: BucketState, now: Now) -> float:
    """The tick (seconds) after which ``state`` holds nothing live, so it can be dropped."""
    t = _ms(now.tick)
    ends = [t]
    ends += [c.slots[-1][0] * c.width + c.span for c in state.windows.values() if c.slots]
    ends += state.leases.values()
    ends += [t + _ms(_period_bounds(u.period)[1] - now.wall) for u in state.quotas.values()]
    return max(ends) / 1000


# -- the checks -----------------------------------------------------------------------


def _window_reset(counter: Counter, t: int) -> float:
    if not counter.slots:
        return 0.0
    return max(0, counter.slots[0][0] * counter.width + counter.span - t) / 1000


def _window_retry(counter: Counter, limit: int, t: int) -> int | None:
    """The smallest wait after which one more request fits: shed the oldest slots."""
    if limit < 1:
        return None
    excess = sum(n for _, n in counter.slots) + 1 - limit
    shed = 0
    for k, n in counter.slots:
        shed += n
        if shed >= excess:
            return k * counter.width + counter.span - t
    return 0


def _add(counter: Counter, t: int) -> Counter:
    k = _slot(t, counter.width)
    slots = counter.slots
    if slots and slots[-1][0] == k:
        return Counter(counter.span, counter.width, (*slots[:-1], (k, slots[-1][1] + 1)))
    return Counter(counter.span, counter.width, (*slots, (k, 1)))


def _counter(state: BucketState, window: Window, tuning: Tuning) -> Counter:
    found = state.windows.get(_window_key(window))
    if found is not None:
        return found  # keeps its own slot width if the tuning changed since
    width = max(1, window.seconds // tuning.slots) * 1000
    return Counter(window.seconds * 1000, width)


def _window_check(state: BucketState, window: Window, t: int, tuning: Tuning) -> _Check:
    counter = _counter(state, window, tuning)
    used = sum(n for _, n in counter.slots)
    name, limit, seconds = window.name, window.limit, window.seconds

    def shown_as(c: Counter, n: int) -> LimitState:
        reset = _window_reset(c, t)
        return LimitState(name, LimitKind.WINDOW, limit, max(0, limit - n), reset, seconds)

    ok = used + 1 <= limit
    retry = None if ok else _window_retry(counter, limit, t)
    return _Check(ok, retry, shown_as(counter, used), shown_as(_add(counter, t), used + 1))


def _quota_check(state: BucketState, quota: Quota, cost: int, wall: float) -> _Check:
    period = _period_id(wall, quota.period)
    usage = state.quotas.get(_quota_key(quota))
    if usage is not None and usage.period >= period:  # a later period: the clock stepped back
        period, used = usage.period, usage.used
    else:
        used = 0
    start, end = _period_bounds(period)
    reset = max(0.0, end - wall)

    def shown_as(n: int) -> LimitState:
        left, length = max(0, quota.limit - n), round(end - start)
        return LimitState(quota.name, LimitKind.QUOTA, quota.limit, left, reset, length)

    ok = used + cost <= quota.limit
    retry = None if cost > quota.limit else _ms(reset)
    return _Check(ok, retry, shown_as(used), shown_as(used + cost))


def _concurrency_check(state: BucketState, cap: int, lease: str | None, t: int) -> _Check:
    held = len(state.leases)
    taken = held if lease in state.leases else held + 1

    def shown_as(count: int) -> LimitState:
        reset = 0.0
        if count >= cap and state.leases:
            reset = min(CONCURRENCY_RETRY, (min(state.leases.values()) - t) / 1000)
        return LimitState(CONCURRENCY, LimitKind.CONCURRENCY, cap, max(0, cap - count), reset)

    before = shown_as(held)
    ok = taken <= cap
    retry = None if ok or cap < 1 else _ms(before.reset_after)
    return _Check(ok, retry, before, shown_as(taken))


def _checks(state: BucketState, request: HitRequest, now: Now, tuning: Tuning) -> list[_Check]:
    t = _ms(now.tick)
    policy = request.policy
    checks = [_window_check(state, w, t, tuning) for w in policy.windows]
    checks += [_quota_check(state, q, request.cost, now.wall) for q in policy.quotas]
    if policy.concurrency is not None:
        checks.append(_concurrency_check(state, policy.concurrency, request.lease, t))
    return checks


def _validate(request: HitRequest) -> None:
    if isinstance(request.cost, bool) or not isinstance(request.cost, int) or request.cost < 0:
        raise ValueError("a hit's cost must be a whole number >= 0")
    if request.policy.concurrency is not None and request.lease is None:
        raise ValueError("a policy with a concurrency cap needs a lease id on each hit")
    if any(w.seconds < 1 for w in request.policy.windows):
        raise ValueError("a window must last at least one second")


# -- the decisions --------------------------------------------------------------------


def _charge(state: BucketState, request: HitRequest, now: Now, tuning: Tuning) -> BucketState:
    """``state`` with the hit counted; limits of one shape share a counter, charged once."""
    t = _ms(now.tick)
    windows = dict(state.windows)
    for key, window in {_window_key(w): w for w in request.policy.windows}.items():
        windows[key] = _add(_counter(state, window, tuning), t)
    quotas = dict(state.quotas)
    for key, quota in {_quota_key(q): q for q in request.policy.quotas}.items():
        if request.cost:
            old = state.quotas.get(key)
            period = _period_id(now.wall, quota.period)
            if old is not None and old.period >= period:
                quotas[key] = Usage(old.period, old.used + request.cost)
            else:
                quotas[key] = Usage(period, request.cost)
    leases = dict(state.leases)
    if request.policy.concurrency is not None and request.lease is not None:
        leases[request.lease] = t + _ms(tuning.lease_ttl)
    return BucketState(windows, quotas, leases)


def evaluate(
    state: BucketState, request: HitRequest, now: Now, tuning: Tuning = DEFAULT_TUNING
) -> tuple[Admission, BucketState]:
    """Check every limit of ``request`` and, only if all admit, charge them all.

    Returns the answer and the state to store. A refusal charges nothing; its
    ``retry_after`` is the longest wait among the refusing limits (``None`` when one of
    them can never admit this request), so a retry exactly that much later passes.

    :raises ValueError: for a negative cost, a cap without a lease, a window under 1 s.
    """
    _validate(request)
    live = prune(state, now)
    checks = _checks(live, request, now, tuning)
    refused = [c for c in checks if not c.ok]
    if not refused:
        return Admission(True, tuple(c.after for c in checks)), _charge(live, request, now, tuning)
    worst = max(refused, key=lambda c: float("inf") if c.retry is None else c.retry)
    retry = None if worst.retry is None else worst.retry / 1000
    states = tuple(c.before for c in checks)
    return Admission(False, states, denied_by=worst.before, retry_after=retry), live


def inspect(
    state: BucketState, policy: LimitPolicy, now: Now, tuning: Tuning = DEFAULT_TUNING
) -> tuple[LimitState, ...]:
    """Where every limit of ``policy`` stands; nothing is charged (a backend's peek)."""
    probe = HitRequest("", policy, cost=0)
    return tuple(c.before for c in _checks(prune(state, now), probe, now, tuning))


def release(state: BucketState, lease: str, now: Now) -> BucketState:
    """The state without ``lease``; an unknown or already released lease changes nothing."""
    live = prune(state, now)
    if lease not in live.leases:
        return live
    leases = {k: v for k, v in live.leases.items() if k != lease}
    return BucketState(live.windows, live.quotas, leases)


# -- configuration --------------------------------------------------------------------


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
