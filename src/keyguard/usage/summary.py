"""Reading usage back: summaries over a time range, percentiles and the error log.

:class:`UsageReader` validates a query (ids, range, granularity; a clear
:class:`~keyguard.errors.InvalidInput` and nothing read when one is wrong), asks the
store for the rows, and adds them up into a :class:`UsageSummary`: the totals and a
series with one point per period (gaps filled with zeros, so a chart needs no
arithmetic), optionally one series per service.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from ..clock import Clock, SystemClock
from ..errors import InvalidInput
from ..validation import parse_duration
from .histogram import percentile
from .records import ErrorEntry, Granularity, RowQuery, UsageCounts, UsageRow
from .store import UsageBackend

__all__ = [
    "MAX_POINTS",
    "UsagePoint",
    "UsageQuery",
    "UsageReader",
    "UsageSummary",
    "counts_dict",
    "summarize",
]

MAX_POINTS = 1500  # a day of minutes, two months of hours: enough for any chart
_MAX_IDS = 1000
_MAX_ID_LENGTH = 200
_SHARES = (("p50", 0.50), ("p95", 0.95), ("p99", 0.99))


@dataclass(frozen=True, slots=True)
class UsagePoint:
    """One period of a series: its start (epoch seconds) and what it counted."""

    start: int
    counts: UsageCounts


@dataclass(frozen=True, slots=True)
class UsageSummary:
    """Usage over ``[since, until)`` at one granularity.

    ``series`` maps a service (``"*"`` for all services together, ``""`` for routes
    that need none) to its points; ``total`` adds up everything, ``by_service`` each
    service's total.
    """

    granularity: Granularity
    since: int
    until: int
    total: UsageCounts
    by_service: dict[str, UsageCounts] = field(default_factory=dict)
    series: dict[str, tuple[UsagePoint, ...]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: what ``keyguard usage --json`` and the server's API print."""
        return {
            "granularity": str(self.granularity),
            "since": self.since,
            "until": self.until,
            "total": counts_dict(self.total),
            "by_service": {name: counts_dict(c) for name, c in sorted(self.by_service.items())},
            "series": {
                name: [{"start": p.start, **counts_dict(p.counts)} for p in points]
                for name, points in sorted(self.series.items())
            },
        }


def counts_dict(counts: UsageCounts) -> dict[str, Any]:
    """Counts as JSON: latency percentiles and mean in milliseconds."""
    latency: dict[str, float | None] = {}
    for name, share in _SHARES:
        value = percentile(counts.latency, share)
        latency[name] = None if value is None else round(value * 1000, 3)
    latency["mean"] = (
        round(counts.latency_sum / counts.requests * 1000, 3) if counts.requests else None
    )
    return {
        "requests": counts.requests,
        "errors": counts.errors,
        "denied": counts.denied,
        "units": counts.units,
        "statuses": dict(sorted(counts.statuses.items())),
        "reasons": dict(sorted(counts.reasons.items())),
        "latency_ms": latency,
    }


def _auto(span: int) -> Granularity:
    if span <= 2 * 3600:
        return Granularity.MINUTE
    if span <= 7 * 86400:
        return Granularity.HOUR
    return Granularity.DAY


def _epoch(field_name: str, value: datetime | float | int | str | None, now: float) -> int | None:
    """An instant as epoch seconds: a datetime, a number, or a duration ago ("24h")."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise InvalidInput(field_name, "must be a time, a timestamp or a duration like 24h")
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise InvalidInput(field_name, "must carry a time zone")
        return math.floor(value.timestamp())
    if isinstance(value, int | float):
        if not math.isfinite(value) or not 0 <= value < 2**40:
            raise InvalidInput(field_name, "is out of range")
        return math.floor(value)
    if isinstance(value, str):
        ago: timedelta = parse_duration(field_name, value)
        return math.floor(now - ago.total_seconds())
    raise InvalidInput(field_name, "must be a time, a timestamp or a duration like 24h")


def _ids(key_ids: Sequence[str] | str | None) -> tuple[str, ...] | None:
    if key_ids is None:
        return None
    ids = (key_ids,) if isinstance(key_ids, str) else tuple(key_ids)
    if len(ids) > _MAX_IDS:
        raise InvalidInput("key_id", f"at most {_MAX_IDS} keys per query")
    for key_id in ids:
        if not isinstance(key_id, str) or not 0 < len(key_id) <= _MAX_ID_LENGTH:
            raise InvalidInput("key_id", "must be a key id")
    return ids


@dataclass(frozen=True, slots=True)
class UsageQuery:
    """What to summarise, as a caller states it (validated by :class:`UsageReader`).

    ``key_id`` (one id or several), ``owner``, or neither for everything; ``since``
    and ``until`` take an aware datetime, epoch seconds, or a duration before now
    (``"24h"``, ``"30d"``); ``granularity`` is ``minute``, ``hour`` or ``day``
    (chosen from the span when omitted); ``service`` narrows to one service and
    ``by_service`` adds one series per service.
    """

    key_id: Sequence[str] | str | None = None
    owner: str | None = None
    since: datetime | float | str | None = "24h"
    until: datetime | float | str | None = None
    granularity: Granularity | str | None = None
    service: str | None = None
    by_service: bool = False


class UsageReader:
    """Queries over a usage store, sync and async.

    :param store: the usage store the recorder writes to.
    :param clock: "now", for ranges given as durations and for the default ``until``.
    """

    def __init__(self, store: UsageBackend, *, clock: Clock | None = None) -> None:
        self.store = store
        self.clock = clock or SystemClock()

    def resolve(self, query: UsageQuery) -> RowQuery:
        """The store query for ``query``; :class:`InvalidInput` when it is wrong."""
        now = self.clock.now()
        end = _epoch("until", query.until, now)
        end = math.floor(now) + 1 if end is None else end
        start = _epoch("since", query.since, now)
        start = end - 86400 if start is None else start
        if start >= end:
            raise InvalidInput("since", "must be before until")
        if query.granularity is None:
            chosen = _auto(end - start)
        else:
            try:
                chosen = Granularity(query.granularity)
            except ValueError:
                raise InvalidInput("granularity", "must be minute, hour or day") from None
        start, end = chosen.floor(start), -(-end // chosen.seconds) * chosen.seconds
        if (end - start) // chosen.seconds > MAX_POINTS:
            raise InvalidInput(
                "since", f"more than {MAX_POINTS} {chosen}s; choose a coarser granularity"
            )
        owner, service = query.owner, query.service
        if owner is not None and (not isinstance(owner, str) or not 0 < len(owner) <= 200):
            raise InvalidInput("owner", "must be an owner name")
        if service is not None and (not isinstance(service, str) or len(service) > 200):
            raise InvalidInput("service", "must be a scope name")
        return RowQuery(chosen, start, end, _ids(query.key_id), owner, service)

    def summary(self, query: UsageQuery) -> UsageSummary:
        """Usage for a key, an owner or everything over a range (see :class:`UsageQuery`)."""
        rows_query = self.resolve(query)
        return summarize(self.store.rows(rows_query), rows_query, by_service=query.by_service)

    async def asummary(self, query: UsageQuery) -> UsageSummary:
        rows_query = self.resolve(query)
        rows = await self.store.arows(rows_query)
        return summarize(rows, rows_query, by_service=query.by_service)

    def errors(self, key_id: str, *, limit: int = 100) -> Sequence[ErrorEntry]:
        """A key's newest error entries first (at most ``limit``, 1-1000)."""
        return self.store.errors(_one_id(key_id), _limit(limit))

    async def aerrors(self, key_id: str, *, limit: int = 100) -> Sequence[ErrorEntry]:
        return await self.store.aerrors(_one_id(key_id), _limit(limit))


def _one_id(key_id: str) -> str:
    ids = _ids(key_id)
    assert ids is not None
    return ids[0]


def _limit(limit: int) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1000:
        raise InvalidInput("limit", "must be 1-1000")
    return limit


def summarize(rows: Sequence[UsageRow], query: RowQuery, *, by_service: bool) -> UsageSummary:
    """Add rows up into totals and zero-filled series (pure)."""
    size = query.granularity.seconds
    starts = range(query.since, query.until, size)
    total = UsageCounts()
    services: dict[str, UsageCounts] = {}
    points: dict[str, dict[int, UsageCounts]] = {"*": {s: UsageCounts() for s in starts}}
    for row in rows:
        total.merge(row.counts)
        services.setdefault(row.service, UsageCounts()).merge(row.counts)
        points["*"][row.start].merge(row.counts)
        if by_service:
            series = points.setdefault(row.service, {s: UsageCounts() for s in starts})
            series[row.start].merge(row.counts)
    return UsageSummary(
        query.granularity,
        query.since,
        query.until,
        total,
        services,
        {name: tuple(UsagePoint(s, c) for s, c in per.items()) for name, per in points.items()},
    )
