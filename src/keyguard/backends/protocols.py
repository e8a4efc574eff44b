"""The contracts a storage backend fulfils.

Each contract is a small pair of Protocols: a sync face and an async face whose
methods carry an ``a`` prefix, so one class can offer both (the memory backend does).
Backends raise :class:`~keyguard.errors.StorageError` for driver failures.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from ..records import AuditEvent, KeyPage, KeyQuery, KeyRecord

__all__ = ["AsyncKeyStore", "KeyBackend", "KeyStore"]


@runtime_checkable
class KeyStore(Protocol):
    """Key records by id and by the digest of any of their live secrets.

    ``save`` writes the record, re-indexes its digests and appends the audit event in
    one atomic step; ``find`` is O(1) in the number of keys.
    """

    def get(self, key_id: str) -> KeyRecord | None: ...

    def find(self, digest: str) -> KeyRecord | None: ...

    def save(self, record: KeyRecord, event: AuditEvent) -> None: ...

    def delete(self, key_id: str, event: AuditEvent) -> bool: ...

    def list(self, query: KeyQuery) -> KeyPage: ...

    def audit(self, key_id: str | None = None, limit: int = 100) -> Sequence[AuditEvent]:
        """The newest audit events first, for one key or for all."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class AsyncKeyStore(Protocol):
    """The async face of :class:`KeyStore`."""

    async def aget(self, key_id: str) -> KeyRecord | None: ...

    async def afind(self, digest: str) -> KeyRecord | None: ...

    async def asave(self, record: KeyRecord, event: AuditEvent) -> None: ...

    async def adelete(self, key_id: str, event: AuditEvent) -> bool: ...

    async def alist(self, query: KeyQuery) -> KeyPage: ...

    async def aaudit(self, key_id: str | None = None, limit: int = 100) -> Sequence[AuditEvent]: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class KeyBackend(KeyStore, AsyncKeyStore, Protocol):
    """A key store with both faces, as every built-in backend is."""
