"""Usage in the process: for tests and single-process apps.

Rows live in a dict keyed by (granularity, start, key, service); each key's error
log is a bounded deque. Stored rows are copies, so a caller mutating what it wrote or
read cannot change the store.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from ..errors import ConfigurationError
from ..usage.records import ErrorEntry, Granularity, RowQuery, UsageBatch, UsageCounts, UsageRow

__all__ = ["MemoryUsageStore"]

_RowKey = tuple[Granularity, int, str, str]


def _copy(counts: UsageCounts) -> UsageCounts:
    fresh = UsageCounts()
    fresh.merge(counts)
    return fresh


class MemoryUsageStore:
    """A usage store held in dictionaries."""

    in_process: ClassVar[bool] = True

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rows: dict[_RowKey, UsageRow] = {}
        self._errors: dict[str, deque[ErrorEntry]] = {}

    @classmethod
    def from_url(cls, url: str, **options: Any) -> MemoryUsageStore:
        """``memory://``: every call gives a new, empty store."""
        if url.rstrip("/") != "memory:":
            raise ConfigurationError("a memory URL takes nothing after memory://")
        return cls(**options)

    def __repr__(self) -> str:
        return f"MemoryUsageStore(rows={len(self._rows)})"

    def write(self, batch: UsageBatch) -> None:
        size = max(1, batch.error_log_size)
        with self._lock:
            for row in batch.rows:
                key = (row.granularity, row.start, row.key_id, row.service)
                stored = self._rows.get(key)
                if stored is None:
                    self._rows[key] = UsageRow(
                        row.granularity,
                        row.start,
                        row.key_id,
                        row.service,
                        row.owner,
                        _copy(row.counts),
                    )
                else:
                    stored.counts.merge(row.counts)
                    stored.owner = row.owner
            for entry in batch.errors:
                log = self._errors.get(entry.key_id)
                if log is None or log.maxlen != size:
                    log = self._errors[entry.key_id] = deque(log or (), maxlen=size)
                log.append(entry)

    def rows(self, query: RowQuery) -> Sequence[UsageRow]:
        keys = None if query.key_ids is None else set(query.key_ids)
        with self._lock:
            return [
                UsageRow(r.granularity, r.start, r.key_id, r.service, r.owner, _copy(r.counts))
                for r in self._rows.values()
                if r.granularity is query.granularity
                and query.since <= r.start < query.until
                and (keys is None or r.key_id in keys)
                and (query.owner is None or r.owner == query.owner)
                and (query.service is None or r.service == query.service)
            ]

    def errors(self, key_id: str, limit: int = 100) -> Sequence[ErrorEntry]:
        with self._lock:
            log = self._errors.get(key_id, ())
            return list(reversed(log))[: max(0, limit)]

    def prune(self, before: Mapping[Granularity, int]) -> None:
        with self._lock:
            for key in [k for k in self._rows if k[1] < before.get(k[0], 0)]:
                del self._rows[key]

    def close(self) -> None:
        """Nothing to release."""

    async def awrite(self, batch: UsageBatch) -> None:
        self.write(batch)

    async def arows(self, query: RowQuery) -> Sequence[UsageRow]:
        return self.rows(query)

    async def aerrors(self, key_id: str, limit: int = 100) -> Sequence[ErrorEntry]:
        return self.errors(key_id, limit)

    async def aprune(self, before: Mapping[Granularity, int]) -> None:
        self.prune(before)

    async def aclose(self) -> None:
        """Nothing to release."""
