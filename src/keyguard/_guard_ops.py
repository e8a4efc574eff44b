"""The guard's two storage operations, as values its sync and async drivers run."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from ._guard_support import in_process
from .backends.protocols import KeyBackend
from .errors import StorageError
from .flows import NOT_NOW, NotNow, Op
from .limiting import Admission, HitRequest, RateBackend
from .records import KeyRecord

__all__ = ["Backends", "CachedKeys", "FindKey", "GetKey", "Hit", "QuickHits"]


@runtime_checkable
class CachedKeys(Protocol):
    """A key store that can answer some lookups from memory, exactly (SQLite)."""

    def find_cached(self, digest: str) -> KeyRecord | None:
        """The record ``find`` would return, when known without I/O; else ``None``
        (which never means "no such key": ask ``find``)."""


@runtime_checkable
class QuickHits(Protocol):
    """A rate store that can take some hits in memory (the SQLite default's split store)."""

    def hit_now(self, request: HitRequest) -> Admission | None:
        """The hit's admission when it needs no I/O, else ``None`` (nothing taken)."""


@dataclass(frozen=True, slots=True)
class Backends:
    """The guard's stores, and what of them answers without I/O (found once, here)."""

    keys: KeyBackend
    limiter: RateBackend | None
    find_now: Callable[[str], KeyRecord | None] | None = field(init=False, repr=False)
    hit_now: Callable[[HitRequest], Admission | None] | None = field(init=False, repr=False)
    # The limiter gives back a slot its cancelled caller took (RedisRateStore on its
    # pipe): a hit needs no task and shield of its own.
    cancel_safe: bool = field(init=False, repr=False)

    def __post_init__(self) -> None:
        keys, limiter = self.keys, self.limiter
        find_now = keys.find_cached if isinstance(keys, CachedKeys) else None
        hit_now: Callable[[HitRequest], Admission | None] | None = None
        if limiter is not None and in_process(limiter):
            hit_now = limiter.hit  # never blocks
        elif limiter is not None and isinstance(limiter, QuickHits):
            hit_now = limiter.hit_now
        object.__setattr__(self, "find_now", find_now)
        object.__setattr__(self, "hit_now", hit_now)
        object.__setattr__(self, "cancel_safe", getattr(limiter, "cancel_safe", False) is True)


@dataclass(frozen=True, slots=True)
class FindKey(Op[Backends, Backends, KeyRecord | None]):
    digest: str

    def now(self, ctx: Backends) -> KeyRecord | NotNow | None:
        found = None if ctx.find_now is None else ctx.find_now(self.digest)
        return NOT_NOW if found is None else found

    def run(self, ctx: Backends) -> KeyRecord | None:
        return ctx.keys.find(self.digest)

    async def arun(self, ctx: Backends) -> KeyRecord | None:
        return await ctx.keys.afind(self.digest)


@dataclass(frozen=True, slots=True)
class GetKey(Op[Backends, Backends, KeyRecord | None]):
    key_id: str

    def run(self, ctx: Backends) -> KeyRecord | None:
        return ctx.keys.get(self.key_id)

    async def arun(self, ctx: Backends) -> KeyRecord | None:
        return await ctx.keys.aget(self.key_id)


@dataclass(frozen=True, slots=True)
class Hit(Op[Backends, Backends, Admission]):
    request: HitRequest

    def now(self, ctx: Backends) -> Admission | NotNow:
        admission = None if ctx.hit_now is None else ctx.hit_now(self.request)
        return NOT_NOW if admission is None else admission

    def run(self, ctx: Backends) -> Admission:
        if ctx.limiter is None:  # pragma: no cover - the flow never yields a hit then
            raise StorageError("no limiter configured")
        return ctx.limiter.hit(self.request)

    async def arun(self, ctx: Backends) -> Admission:
        limiter = ctx.limiter
        if limiter is None:  # pragma: no cover - the flow never yields a hit then
            raise StorageError("no limiter configured")
        lease = self.request.lease
        if lease is None or ctx.cancel_safe:
            return await limiter.ahit(self.request)
        # A hit that takes a concurrency slot may run on after this task is cancelled
        # (in a worker thread, on a server), and nobody would give the slot back: the
        # key would stay at "full" until the lease expires (T82). So the hit is
        # shielded; on cancellation we wait for it and release what it took. A
        # limiter that declares ``cancel_safe`` does that itself, with no task.
        hit = asyncio.ensure_future(limiter.ahit(self.request))
        try:
            return await asyncio.shield(hit)
        except asyncio.CancelledError:
            with contextlib.suppress(StorageError):
                if (await hit).allowed:
                    await limiter.arelease(self.request.bucket, lease)
            raise
