"""What a limiter keeps per bucket, changed in place, and the UTC periods of its quotas.

:mod:`keyguard.windows` holds the arithmetic; this module its state: a :class:`Bucket`
of window :class:`Counter` objects, quota :class:`Usage` and leases, each mutable so a
hit costs no rebuilding. Working out which UTC day (``YYYY-MM-DD``) or month
(``YYYY-MM``) a wall time falls in takes datetime arithmetic, too slow for every hit:
:func:`period_at` remembers the current period of each kind and recomputes only when
the wall time leaves it, so that work happens once a rollover.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from datetime import UTC, date, datetime
from functools import lru_cache
from typing import NamedTuple

from .clock import from_timestamp
from .limiting import QuotaPeriod

__all__ = [
    "Bucket",
    "Counter",
    "Now",
    "Period",
    "Usage",
    "current_period",
    "idle_at",
    "period_at",
    "period_named",
    "prune",
    "to_ms",
]


class Now(NamedTuple):
    """The time of one decision, as the backend read it.

    ``tick`` drives windows and leases (monotonic in one process, wall time when
    processes share the state); ``wall`` places quotas in the UTC calendar.
    """

    tick: float
    wall: float


def to_ms(seconds: float) -> int:
    """Seconds as whole milliseconds, the unit every counter and lease keeps."""
    return round(seconds * 1000)


class Period(NamedTuple):
    """One UTC day or month: its id, start and end (epoch seconds), length in seconds."""

    key: str
    start: float
    end: float
    length: int


_CURRENT: dict[QuotaPeriod, Period] = {}


def _midnight(day: date) -> float:
    return datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()


@lru_cache(maxsize=512)
def period_named(kind: QuotaPeriod, key: str) -> Period:
    """The period a stored id names. :raises ValueError: if ``key`` is no id of ``kind``."""
    month = kind is QuotaPeriod.MONTH
    if len(key) != (7 if month else 10):
        raise ValueError(f"not a UTC {kind.value} id")
    start = date.fromisoformat(key + "-01" if month else key)
    if start.isoformat()[: len(key)] != key:  # fromisoformat takes other spellings too
        raise ValueError(f"not a UTC {kind.value} id")
    if month:
        end = date(start.year + start.month // 12, start.month % 12 + 1, 1)
    else:
        end = date.fromordinal(start.toordinal() + 1)
    first, last = _midnight(start), _midnight(end)
    return Period(key, first, last, round(last - first))


def period_at(wall: float, kind: QuotaPeriod) -> Period:
    """The UTC day or month holding ``wall`` (cached until the wall time leaves it)."""
    found = _CURRENT.get(kind)
    if found is not None and found.start <= wall < found.end:
        return found
    # Days start on whole seconds, so the floor lies in the same day, and converts exactly
    # (datetime would round 0.5 us before midnight into the next day).
    text = from_timestamp(math.floor(wall)).date().isoformat()
    found = period_named(kind, text if kind is QuotaPeriod.DAY else text[:7])
    _CURRENT[kind] = found
    return found


def current_period(wall: float, period: QuotaPeriod) -> tuple[str, float, float]:
    """The UTC day or month holding ``wall``: its id, start and end (epoch seconds)."""
    found = period_at(wall, period)
    return found.key, found.start, found.end


class Counter:
    """One window's requests, in milliseconds: slot ``keys[i]`` holds the ``counts[i]``
    requests made in ``((k - 1) * width, k * width]``; keys rise, ``total`` sums counts."""

    __slots__ = ("counts", "keys", "span", "total", "width")

    def __init__(self, span: int, width: int, slots: Iterable[tuple[int, int]] = ()) -> None:
        self.span, self.width = span, width
        self.keys: list[int] = []
        self.counts: list[int] = []
        for k, n in slots:
            self.keys.append(k)
            self.counts.append(n)
        self.total = sum(self.counts)

    def prune(self, t: int) -> bool:
        """Drop slots that left the window; fold slots from the future (a clock stepped
        back) into the current one, so a step neither forgets requests nor locks out.
        Says whether anything changed."""
        keys, width = self.keys, self.width
        if not keys:
            return False
        changed = False
        floor = t - self.span
        if keys[0] * width <= floor:
            gone = 1
            while gone < len(keys) and keys[gone] * width <= floor:
                gone += 1
            self.total -= sum(self.counts[:gone])
            del keys[:gone], self.counts[:gone]
            changed = True
        now = -(-t // width)
        if keys and keys[-1] > now:
            future = 0
            while keys and keys[-1] > now:
                keys.pop()
                future += self.counts.pop()
            if keys and keys[-1] == now:
                self.counts[-1] += future
            else:
                keys.append(now)
                self.counts.append(future)
            changed = True
        return changed


class Usage:
    """Units used in one quota period."""

    __slots__ = ("period", "used")

    def __init__(self, period: Period, used: int) -> None:
        self.period, self.used = period, used


class Bucket:
    """Everything counted for one bucket, changed in place.

    Keys: windows ``"<seconds>:<scope>"``, quotas ``"<day|month>:<scope>"`` (so limits
    of the same shape share a counter, and a renamed or re-limited window keeps its
    count); leases map a lease id to its expiry tick in milliseconds. A stored counter
    always holds a slot. ``idle`` is a tick (ms) by which everything charged so far has
    expired (a bound: expiry re-checks before it drops anything); ``dirty`` says whether
    anything changed since the bucket was loaded (the backend clears it).
    """

    __slots__ = ("dirty", "idle", "lease_min", "leases", "quotas", "windows")

    def __init__(self) -> None:
        self.windows: dict[str, Counter] = {}
        self.quotas: dict[str, Usage] = {}
        self.leases: dict[str, int] = {}
        self.lease_min = 0  # no lease expires before this tick (ms)
        self.idle = 0
        self.dirty = False

    def is_empty(self) -> bool:
        return not (self.windows or self.quotas or self.leases)

    # expiry, in place: dropping what expired changes no answer, but marks the bucket dirty

    def live_counter(self, key: str, t: int) -> Counter | None:
        """The window counter ``key`` without expired slots, or ``None`` if none is left."""
        counter = self.windows.get(key)
        if counter is None or (not counter.prune(t) and counter.keys):
            return counter
        self.dirty = True
        if counter.keys:
            return counter
        del self.windows[key]
        return None

    def live_usage(self, key: str, wall: float) -> Usage | None:
        """The usage unless its period is past; a later one (the clock stepped back) stays."""
        usage = self.quotas.get(key)
        if usage is None or wall < usage.period.end:
            return usage
        del self.quotas[key]
        self.dirty = True
        return None

    def live_leases(self, t: int) -> dict[str, int]:
        """The leases that have not expired by ``t``."""
        if self.leases and self.lease_min <= t:
            live = {lease: end for lease, end in self.leases.items() if end > t}
            self.lease_min = min(live.values(), default=0)
            if len(live) != len(self.leases):
                self.leases = live
                self.dirty = True
        return self.leases

    def snapshot(self) -> tuple[object, ...]:
        """What the bucket counts, as plain values (for comparisons)."""
        windows = {
            k: (c.span, c.width, tuple(zip(c.keys, c.counts, strict=True)))
            for k, c in self.windows.items()
        }
        quotas = {k: (u.period.key, u.used) for k, u in self.quotas.items()}
        return windows, quotas, dict(self.leases)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Bucket) and self.snapshot() == other.snapshot()

    __hash__ = None  # type: ignore[assignment]

    def copy(self) -> Bucket:
        twin = Bucket()
        for key, c in self.windows.items():
            twin.windows[key] = Counter(c.span, c.width, zip(c.keys, c.counts, strict=True))
        twin.quotas = {k: Usage(u.period, u.used) for k, u in self.quotas.items()}
        twin.leases = dict(self.leases)
        twin.lease_min, twin.idle, twin.dirty = self.lease_min, self.idle, self.dirty
        return twin


def prune(bucket: Bucket, now: Now) -> None:
    """Drop everything expired from ``bucket``: empty slots, past periods, dead leases."""
    t = to_ms(now.tick)
    for key in list(bucket.windows):
        bucket.live_counter(key, t)
    for key, usage in list(bucket.quotas.items()):
        if usage.used <= 0 or now.wall >= usage.period.end:
            del bucket.quotas[key]
            bucket.dirty = True
    bucket.live_leases(t)


def idle_at(bucket: Bucket, now: Now) -> float:
    """The tick (seconds) after which ``bucket`` holds nothing live, so it can be dropped."""
    t = to_ms(now.tick)
    ends = [t, *bucket.leases.values()]
    ends += [c.keys[-1] * c.width + c.span for c in bucket.windows.values() if c.keys]
    ends += [t + to_ms(u.period.end - now.wall) for u in bucket.quotas.values()]
    return max(ends) / 1000
