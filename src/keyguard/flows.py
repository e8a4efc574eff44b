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
from .errors import StorageError
from .records import AuditEvent, KeyPage, KeyQuery, KeyRecord

__all__ = [
    "Audit",
    "Delete",
    "Find",
    "Flow",
    "Get",
    "KeyOp",
    "List",
    "Op",
    "Save",
    "call",
    "run_async",
    "run_sync",
]

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)
S = TypeVar("S")
A = TypeVar("A")
S_contra = TypeVar("S_contra", contravariant=True)
A_contra = TypeVar("A_contra", contravariant=True)


class Op(Generic[S_contra, A_contra, T_co]):
    """One storage operation: ``run`` against a sync context ``S``, ``arun`` an async ``A``.

    A :class:`~keyguard.errors.StorageError` raised by the operation is thrown back
    into the flow at its ``yield``, so a flow can apply its own failure policy.
    """

    __slots__ = ()

    def run(self, ctx: S_contra) -> T_co:
        raise NotImplementedError

    async def arun(self, ctx: A_contra) -> T_co:
        raise NotImplementedError


KeyOp: TypeAlias = Op[KeyStore, AsyncKeyStore, T]
Flow: TypeAlias = Generator[Op[KeyStore, AsyncKeyStore, Any], Any, T]


def call(op: Op[S, A, T]) -> Generator[Op[S, A, Any], Any, T]:
    """``result = yield from call(op)``: run one operation, typed."""
    result: T = yield op
    return result


@dataclass(frozen=True, slots=True)
class Get(KeyOp[KeyRecord | None]):
    key_id: str

    def run(self, store: KeyStore) -> KeyRecord | None:
        return store.get(self.key_id)

    async def arun(self, store: AsyncKeyStore) -> KeyRecord | None:
        return await store.aget(self.key_id)


@dataclass(frozen=True, slots=True)
class Find(KeyOp[KeyRecord | None]):
    digest: str

    def run(self, store: KeyStore) -> KeyRecord | None:
        return store.find(self.digest)

    async def arun(self, store: AsyncKeyStore) -> KeyRecord | None:
        return await store.afind(self.digest)


@dataclass(frozen=True, slots=True)
class Save(KeyOp[None]):
    record: KeyRecord
    event: AuditEvent

    def run(self, store: KeyStore) -> None:
        store.save(self.record, self.event)

    async def arun(self, store: AsyncKeyStore) -> None:
        await store.asave(self.record, self.event)


@dataclass(frozen=True, slots=True)
class Delete(KeyOp[bool]):
    key_id: str
    event: AuditEvent

    def run(self, store: KeyStore) -> bool:
        return store.delete(self.key_id, self.event)

    async def arun(self, store: AsyncKeyStore) -> bool:
        return await store.adelete(self.key_id, self.event)


@dataclass(frozen=True, slots=True)
class List(KeyOp[KeyPage]):
    query: KeyQuery

    def run(self, store: KeyStore) -> KeyPage:
        return store.list(self.query)

    async def arun(self, store: AsyncKeyStore) -> KeyPage:
        return await store.alist(self.query)


@dataclass(frozen=True, slots=True)
class Audit(KeyOp[Sequence[AuditEvent]]):
    key_id: str | None
    limit: int

    def run(self, store: KeyStore) -> Sequence[AuditEvent]:
        return store.audit(self.key_id, self.limit)

    async def arun(self, store: AsyncKeyStore) -> Sequence[AuditEvent]:
        return await store.aaudit(self.key_id, self.limit)


def run_sync(flow: Generator[Op[S, Any, Any], Any, T], ctx: S) -> T:
    """Drive ``flow`` to its result with the context's blocking methods."""
    try:
        op = next(flow)
        while True:
            try:
                result = op.run(ctx)
            except StorageError as exc:
                op = flow.throw(exc)
            else:
                op = flow.send(result)
    except StopIteration as stop:
        value: T = stop.value
        return value


async def run_async(flow: Generator[Op[Any, A, Any], Any, T], ctx: A) -> T:
    """Drive ``flow`` to its result with the context's coroutines."""
    try:
        op = next(flow)
        while True:
            try:
                result = await op.arun(ctx)
            except StorageError as exc:
                op = flow.throw(exc)
            else:
                op = flow.send(result)
    except StopIteration as stop:
        value: T = stop.value
        return value
