"""Keys in the process: for tests and single-process apps.

One class serves both the sync and async faces; a lock makes it safe for threaded
WSGI servers, and the async methods never block on I/O, so they simply call through.
"""

from __future__ import annotations

import bisect
import threading
from collections import deque
from collections.abc import Sequence
from typing import Any, ClassVar

from ..errors import ConfigurationError, StorageError
from ..records import AuditEvent, KeyPage, KeyQuery, KeyRecord
from ._listing import page_of

__all__ = ["MemoryKeyStore"]


class MemoryKeyStore:
    """A key store held in dictionaries.

    :param audit_size: how many audit events to keep (oldest dropped first).
    """

    in_process: ClassVar[bool] = True  # never blocks: async callers may call the sync face

    def __init__(self, *, audit_size: int = 10_000) -> None:
        self._lock = threading.Lock()
        self._records: dict[str, KeyRecord] = {}
        self._ids: list[str] = []  # sorted, for cursor pagination
        # digest -> record itself (not its id): one hash lookup per request, not two.
        self._by_digest: dict[str, KeyRecord] = {}
        self._audit: deque[AuditEvent] = deque(maxlen=audit_size)

    @classmethod
    def from_url(cls, url: str, **options: Any) -> MemoryKeyStore:
        """``memory://``: every call gives a new, empty store."""
        if url.rstrip("/") != "memory:":
            raise ConfigurationError("a memory URL takes nothing after memory://")
        return cls(**options)

    def __repr__(self) -> str:
        return f"MemoryKeyStore(keys={len(self._records)})"

    # sync face

    def get(self, key_id: str) -> KeyRecord | None:
        return self._records.get(key_id)

    def find(self, digest: str) -> KeyRecord | None:
        return self._by_digest.get(digest)

    def save(self, record: KeyRecord, event: AuditEvent) -> None:
        with self._lock:
            for d in record.digests:
                holder = self._by_digest.get(d.digest)
                if holder is not None and holder.id != record.id:
                    raise StorageError("a digest already belongs to another key")
            old = self._records.get(record.id)
            if old is None:
                bisect.insort(self._ids, record.id)
            else:
                for d in old.digests:
                    self._by_digest.pop(d.digest, None)
            self._records[record.id] = record
            for d in record.digests:
                self._by_digest[d.digest] = record
            self._audit.append(event)

    def delete(self, key_id: str, event: AuditEvent) -> bool:
        with self._lock:
            old = self._records.pop(key_id, None)
            if old is None:
                return False
            del self._ids[bisect.bisect_left(self._ids, key_id)]
            for d in old.digests:
                self._by_digest.pop(d.digest, None)
            self._audit.append(event)
            return True

    def list(self, query: KeyQuery) -> KeyPage:
        with self._lock:
            start = 0 if query.after is None else bisect.bisect_right(self._ids, query.after)
            ids = self._ids[start:]
        return page_of((self._records[i] for i in ids if i in self._records), query)

    def audit(self, key_id: str | None = None, limit: int = 100) -> Sequence[AuditEvent]:
        with self._lock:
            events = list(self._audit)
        newest = (e for e in reversed(events) if key_id is None or e.key_id == key_id)
        return [e for _, e in zip(range(limit), newest, strict=False)]

    def close(self) -> None:
        """Nothing to release."""

    # async face: nothing here blocks, so the coroutines call straight through

    async def aget(self, key_id: str) -> KeyRecord | None:
        return self.get(key_id)

    async def afind(self, digest: str) -> KeyRecord | None:
        return self.find(digest)

    async def asave(self, record: KeyRecord, event: AuditEvent) -> None:
        self.save(record, event)

    async def adelete(self, key_id: str, event: AuditEvent) -> bool:
        return self.delete(key_id, event)

    async def alist(self, query: KeyQuery) -> KeyPage:
        return self.list(query)

    async def aaudit(self, key_id: str | None = None, limit: int = 100) -> Sequence[AuditEvent]:
        return self.audit(key_id, limit)

    async def aclose(self) -> None:
        self.close()
