"""The guard's two storage operations, as values its sync and async drivers run."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from .backends.protocols import KeyBackend
from .errors import StorageError
from .flows import Op
from .limiting import Admission, HitRequest, RateBackend
from .records import KeyRecord

__all__ = ["Backends", "FindKey", "GetKey", "Hit"]


@dataclass(frozen=True, slots=True)
class Backends:
    keys: KeyBackend
    limiter: RateBackend | None


@dataclass(frozen=True, slots=True)
class FindKey(Op[Backends, Backends, KeyRecord | None]):
    digest: str

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

    def run(self, ctx: Backends) -> Admission:
        if ctx.limiter is None:  # pragma: no cover - the flow never yields a hit then
            raise StorageError("no limiter configured")
        return ctx.limiter.hit(self.request)

    async def arun(self, ctx: Backends) -> Admission:
        limiter = ctx.limiter
        if limiter is None:  # pragma: no cover - the flow never yields a hit then
            raise StorageError("no limiter configured")
        lease = self.request.lease
        if lease is None:
            return await limiter.ahit(self.request)
        # A hit that takes a concurrency slot may run on after this task is cancelled
        # (in a worker thread, on a server), and nobody would give the slot back: the
        # key would stay at "full" until the lease expires (T82). So the hit is
        # shielded; on cancellation we wait for it and release what it took.
        hit = asyncio.ensure_future(limiter.ahit(self.request))
        try:
            return await asyncio.shield(hit)
        except asyncio.CancelledError:
            with contextlib.suppress(StorageError):
                if (await hit).allowed:
                    await limiter.arelease(self.request.bucket, lease)
            raise
