"""Storage operations as values, and the drivers that run a flow against a store.

Admin operations and authentication are written once, as generators that ``yield``
an operation and receive its result. :func:`run_sync` and :func:`run_async` are the
only places that differ between the sync and async faces (the httpx ``auth_flow``
pattern), so the logic can never drift between them. :func:`run_hybrid` serves the
async face of stores whose I/O is blocking (SQLite): it runs on the event loop what
can be answered from memory, and the rest in one worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import enum
from collections.abc import Awaitable, Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeAlias, TypeVar

from .backends.protocols import AsyncKeyStore, KeyStore
from .errors import StorageError
from .records import AuditEvent, KeyPage, KeyQuery, KeyRecord

__all__ = [
    "NOT_NOW",
    "Audit",
    "Delete",
    "Find",
    "Flow",
    "Get",
    "KeyOp",
    "List",
    "NotNow",
    "Op",
    "Save",
    "call",
    "run_async",
    "run_hybrid",
    "run_sync",
]

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)
S = TypeVar("S")
A = TypeVar("A")
S_contra = TypeVar("S_contra", contravariant=True)
A_contra = TypeVar("A_contra", contravariant=True)


class NotNow(enum.Enum):
    """The type of :data:`NOT_NOW`."""

    NOT_NOW = enum.auto()


NOT_NOW: Final = NotNow.NOT_NOW
"""What :meth:`Op.now` returns when only I/O can answer (a result may itself be ``None``)."""


class Op(Generic[S_contra, A_contra, T_co]):
    """One storage operation: ``run`` against a sync context ``S``, ``arun`` an async ``A``.

    A :class:`~keyguard.errors.StorageError` raised by the operation is thrown back
    into the flow at its ``yield``, so a flow can apply its own failure policy.
    """

    __slots__ = ()

    def now(self, ctx: S_contra) -> T_co | NotNow:
        """The result when it is at hand without I/O (a cache, process memory), else
        :data:`NOT_NOW`; :func:`run_hybrid` asks this first. By default: never."""
        return NOT_NOW

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
    except StopIteration as stop:
        value: T = stop.value
        return value
    return _run_from(flow, op, ctx)


def _run_from(flow: Generator[Op[S, Any, Any], Any, T], op: Op[S, Any, Any], ctx: S) -> T:
    """:func:`run_sync` of a flow that has just yielded ``op``."""
    try:
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


async def run_hybrid(
    flow: Generator[Op[S, Any, Any], Any, T],
    ctx: S,
    *,
    abandoned: Callable[[T], Awaitable[object]] | None = None,
) -> T:
    """Drive ``flow`` with the context's blocking methods without blocking the loop.

    For stores whose async face is their sync one in a worker thread. Each operation
    is first asked for its result :meth:`~Op.now`; while it has one, the flow runs on
    here, with no thread, task or hand-off between threads. The first one that has
    not goes, with the rest of the flow, to one worker thread (a generator may be
    resumed from another thread, never by two at once), in a copy of the caller's
    context, so that a span opened by the flow is a child of the caller's.

    The thread cannot be stopped: when the caller is cancelled meanwhile, its work is
    waited for, and its result, which nobody will receive, goes to ``abandoned``
    (to give back what it took: a concurrency slot, T82) before the cancellation
    goes on.
    """
    try:
        op = next(flow)
        while True:
            try:
                result = op.now(ctx)
            except StorageError as exc:
                op = flow.throw(exc)
                continue
            if result is NOT_NOW:
                break
            op = flow.send(result)
    except StopIteration as stop:
        value: T = stop.value
        return value
    run = contextvars.copy_context().run
    work = asyncio.get_running_loop().run_in_executor(None, run, _run_from, flow, op, ctx)
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        if abandoned is not None:
            with contextlib.suppress(Exception):  # the work failed: nothing was taken
                await abandoned(await work)
        raise
