"""Storage operations as values, and the two drivers that run a flow against a store.

Admin operations and authentication are written once, as generators that ``yield``
an operation and receive its result. :func:`run_sync` and :func:`run_async` are the
only places that differ between the sync and async faces (the httpx ``auth_flow``
pattern), so the logic can never drift between them.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeAlias, TypeVar

from .backends.protocols import AsyncKeyStore, KeyStore
from .records import AuditEvent, KeyPage, KeyQuery, KeyRecord

__all__ = ["Audit", "Delete", "Find", "Flow", "Get", "List", "Op", "Save", "run_async", "run_sync"]

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class Op(Generic[T_co]):
    """One storage operation whose result has type ``T_co``."""

    __slots__ = ()

    def run(self, store: KeyStore) -> T_co:
        raise NotImplementedError

    async def arun(self, store: AsyncKeyStore) -> T_co:
        raise NotImplementedError


Flow: TypeAlias = Generator[Op[Any], Any, T]


def call(op: Op[T]) -> Flow[T]:
    """``result = yield from call(op)``: run one operation, typed."""
    result: T = yield op
    return result


@dataclass(frozen=True, slots=True)
class Get(Op[KeyRecord | None]):
    key_id: str

    def run(self, store: KeyStore) -> KeyRecord | None:
        return store.get(self.key_id)

    async def arun(self, store: AsyncKeyStore) -> KeyRecord | None:
        return await store.aget(self.key_id)


@dataclass(frozen=True, slots=True)
class Find(Op[KeyRecord | None]):
    digest: str

    def run(self, store: KeyStore) -> KeyRecord | None:
        return store.find(self.digest)

    async def arun(self, store: AsyncKeyStore) -> KeyRecord | None:
        return await store.afind(self.digest)


@dataclass(frozen=True, slots=True)
class Save(Op[None]):
    record: KeyRecord
    event: AuditEvent

    def run(self, store: KeyStore) -> None:
        store.save(self.record, self.event)

    async def arun(self, store: AsyncKeyStore) -> None:
        await store.asave(self.record, self.event)


@dataclass(frozen=True, slots=True)
class Delete(Op[bool]):
    key_id: str
    event: AuditEvent

    def run(self, store: KeyStore) -> bool:
        return store.delete(self.key_id, self.event)

    async def arun(self, store: AsyncKeyStore) -> bool:
        return await store.adelete(self.key_id, self.event)


@dataclass(frozen=True, slots=True)
class List(Op[KeyPage]):
    query: KeyQuery

    def run(self, store: KeyStore) -> KeyPage:
        return store.list(self.query)

    async def arun(self, store: AsyncKeyStore) -> KeyPage:
        return await store.alist(self.query)


@dataclass(frozen=True, slots=True)
class Audit(Op[Sequence[AuditEvent]]):
    key_id: str | None
    limit: int

    def run(self, store: KeyStore) -> Sequence[AuditEvent]:
        return store.audit(self.key_id, self.limit)

    async def arun(self, store: AsyncKeyStore) -> Sequence[AuditEvent]:
        return await store.aaudit(self.key_id, self.limit)


def run_sync(flow: Flow[T], store: KeyStore) -> T:
    """Drive ``flow`` to its result with the store's blocking methods."""
    try:
        op = next(flow)
        while True:
            op = flow.send(op.run(store))
    except StopIteration as stop:
        result: T = stop.value
        return result


async def run_async(flow: Flow[T], store: AsyncKeyStore) -> T:
    """Drive ``flow`` to its result with the store's coroutines."""
    try:
        op = next(flow)
        while True:
            op = flow.send(await op.arun(store))
    except StopIteration as stop:
        result: T = stop.value
        return result
