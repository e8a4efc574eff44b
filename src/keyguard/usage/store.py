"""The contract every usage store keeps, through a sync face and an async face.

Stores only add up and hand back what the recorder gives them: aggregation happens
in the process (:mod:`.recorder`), queries are shaped in :mod:`.summary`. ``write``
adds each row's counts to the stored row of the same granularity, start, key and
service (creating it), so batches from several processes sum exactly. Stores raise
:class:`~keyguard.errors.StorageError` for driver failures.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

from .records import ErrorEntry, Granularity, RowQuery, UsageBatch, UsageRow

__all__ = ["AsyncUsageStore", "UsageBackend", "UsageStore"]


@runtime_checkable
class UsageStore(Protocol):
    def write(self, batch: UsageBatch) -> None:
        """Add the batch's rows and append its errors, trimming each key's log."""
        ...

    def rows(self, query: RowQuery) -> Sequence[UsageRow]:
        """The stored rows matching ``query``, in no particular order."""
        ...

    def errors(self, key_id: str, limit: int = 100) -> Sequence[ErrorEntry]:
        """A key's newest error entries first."""
        ...

    def prune(self, before: Mapping[Granularity, int]) -> None:
        """Drop rows of each granularity that start before the given epoch second."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class AsyncUsageStore(Protocol):
    async def awrite(self, batch: UsageBatch) -> None: ...

    async def arows(self, query: RowQuery) -> Sequence[UsageRow]: ...

    async def aerrors(self, key_id: str, limit: int = 100) -> Sequence[ErrorEntry]: ...

    async def aprune(self, before: Mapping[Granularity, int]) -> None: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class UsageBackend(UsageStore, AsyncUsageStore, Protocol):
    """A usage store with both faces, as every built-in one is."""
