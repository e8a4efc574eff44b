"""What usage is made of: events, the counts they add up to, and the error log.

Nothing here holds a secret, a query string, a header or a body: an event carries the
key's id and the route *template*, and an error entry the fixed message of the denial
table or the status's reason phrase (SECURITY.md C7).
"""

from __future__ import annotations

import enum
import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import NamedTuple

from ..limiting import LimitState
from ..records import JSON
from .histogram import merge_into

__all__ = [
    "ErrorEntry",
    "Granularity",
    "RowQuery",
    "UsageBatch",
    "UsageCounts",
    "UsageEvent",
    "UsageRow",
]


class Granularity(enum.StrEnum):
    """The periods usage is counted in; each event is counted in all three."""

    MINUTE = "minute"
    HOUR = "hour"
    DAY = "day"

    @property
    def seconds(self) -> int:
        return _SECONDS[self]

    def floor(self, at: float) -> int:
        """The start (epoch seconds, UTC) of the period holding ``at``."""
        size = _SECONDS[self]
        return int(at // size) * size


_SECONDS = {Granularity.MINUTE: 60, Granularity.HOUR: 3600, Granularity.DAY: 86400}


class UsageEvent(NamedTuple):
    """One finished request of a known key (a named tuple: one is built per request).

    ``service`` is the scope the route needs (``None`` for none); ``route`` the route
    template, or the path when the framework gives none (never the query string);
    ``reason`` the denial code when keyguard refused the request. ``limits`` is where
    the key's limits stood after admission, for alert listeners; stores never see it.
    """

    at: float
    key_id: str
    owner: str | None
    service: str | None
    method: str
    route: str
    status: int
    latency: float
    units: int
    reason: str | None
    client_ip: str | None
    request_id: str
    limits: tuple[LimitState, ...] = ()


@dataclass(slots=True)
class UsageCounts:
    """What happened in one period for one key and service; adding two is exact.

    ``errors`` counts responses with status 400 or more and every refusal; ``denied``
    the refusals alone. ``latency`` is a histogram (see :mod:`.histogram`) and
    ``latency_sum`` the total in seconds, for means.
    """

    requests: int = 0
    errors: int = 0
    denied: int = 0
    units: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    reasons: dict[str, int] = field(default_factory=dict)
    latency: dict[int, int] = field(default_factory=dict)
    latency_sum: float = 0.0

    def add(self, event: UsageEvent, bucket: int) -> None:
        self.requests += 1
        if event.status >= 400 or event.reason is not None:
            self.errors += 1
        if event.reason is not None:
            self.denied += 1
            self.reasons[event.reason] = self.reasons.get(event.reason, 0) + 1
        self.units += event.units
        status_class = f"{event.status // 100}xx"
        self.statuses[status_class] = self.statuses.get(status_class, 0) + 1
        self.latency[bucket] = self.latency.get(bucket, 0) + 1
        self.latency_sum += event.latency

    def merge(self, other: UsageCounts) -> None:
        self.requests += other.requests
        self.errors += other.errors
        self.denied += other.denied
        self.units += other.units
        for name, count in other.statuses.items():
            self.statuses[name] = self.statuses.get(name, 0) + count
        for name, count in other.reasons.items():
            self.reasons[name] = self.reasons.get(name, 0) + count
        merge_into(self.latency, other.latency)
        self.latency_sum += other.latency_sum

    def to_json(self) -> str:
        """A compact JSON object, as SQLite stores it."""
        return json.dumps(
            {
                "n": self.requests,
                "e": self.errors,
                "d": self.denied,
                "u": self.units,
                "s": self.statuses,
                "r": self.reasons,
                "h": {str(k): v for k, v in self.latency.items()},
                "t": self.latency_sum,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> UsageCounts:
        data = json.loads(text)
        return cls(
            requests=int(data["n"]),
            errors=int(data["e"]),
            denied=int(data["d"]),
            units=int(data["u"]),
            statuses={str(k): int(v) for k, v in data["s"].items()},
            reasons={str(k): int(v) for k, v in data["r"].items()},
            latency={int(k): int(v) for k, v in data["h"].items()},
            latency_sum=float(data["t"]),
        )


@dataclass(slots=True)
class UsageRow:
    """The counts of one key and service over one period starting at ``start``.

    ``service`` is ``""`` for requests to routes that need no scope. ``owner`` is the
    key's owner when the events were recorded, so usage can be read by owner.
    """

    granularity: Granularity
    start: int
    key_id: str
    service: str
    owner: str | None
    counts: UsageCounts


@dataclass(frozen=True, slots=True)
class ErrorEntry:
    """One failed or refused request in a key's error log."""

    at: float
    key_id: str
    owner: str | None
    service: str | None
    method: str
    route: str
    status: int
    code: str
    message: str
    request_id: str

    def to_dict(self) -> dict[str, JSON]:
        """For people and APIs: the time as ISO-8601 UTC, the key's id and owner left out."""
        shown: dict[str, JSON] = asdict(self)
        del shown["key_id"], shown["owner"]
        shown["at"] = datetime.fromtimestamp(self.at, UTC).isoformat().replace("+00:00", "Z")
        return shown

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> ErrorEntry:
        data = json.loads(text)
        return cls(
            at=float(data["at"]),
            key_id=str(data["key_id"]),
            owner=data["owner"],
            service=data["service"],
            method=str(data["method"]),
            route=str(data["route"]),
            status=int(data["status"]),
            code=str(data["code"]),
            message=str(data["message"]),
            request_id=str(data["request_id"]),
        )


@dataclass(frozen=True, slots=True)
class UsageBatch:
    """One flush: row deltas to add (every granularity) and error entries to append.

    A store keeps at most ``error_log_size`` newest entries per key. ``writer`` names
    the recorder that made the batch and ``sequence`` numbers its batches from 1: a
    recorder sends a failed batch again, unchanged, before any later one, so a store
    that may apply part of a batch before failing (Redis pipelines) skips what it
    already applied from that writer and sequence. ``""`` and ``0`` ask for no
    such check (a store that applies batches whole needs none).
    """

    rows: tuple[UsageRow, ...]
    errors: tuple[ErrorEntry, ...] = ()
    error_log_size: int = 100
    writer: str = ""
    sequence: int = 0


@dataclass(frozen=True, slots=True)
class RowQuery:
    """Rows of one granularity with ``since <= start < until``.

    ``key_ids`` narrows to those keys, ``owner`` to one owner's rows, ``service`` to
    one service; ``None`` means no narrowing on that field.
    """

    granularity: Granularity
    since: int
    until: int
    key_ids: tuple[str, ...] | None = None
    owner: str | None = None
    service: str | None = None
