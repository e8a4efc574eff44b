"""``/healthz`` (the process answers) and ``/readyz`` (its stores answer too).

Readiness makes one real call to the key store and one to the limiter, each with a
deadline, so a load balancer stops sending traffic to a server whose Redis or
SQLite file is gone (503), instead of to one that would refuse every request. The
limiter's probe reads a window and a quota: on the embedded default windows count in
memory and quotas in the file, and the file is the one that can fail.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Literal

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from keyguard import Guard, StorageError
from keyguard.limiting import LimitPolicy, Quota, QuotaPeriod, Window
from keyguard.records import KeyQuery

__all__ = ["router"]

_DEADLINE = 2.0
_PROBE = LimitPolicy(
    windows=(Window("readyz", 1, 1),), quotas=(Quota("readyz", 1, QuotaPeriod.DAY),)
)
Check = Literal["ok", "down"]


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, Check]


async def _probe(call: Awaitable[object]) -> Check:
    try:
        await asyncio.wait_for(call, _DEADLINE)
    except (StorageError, TimeoutError, OSError):
        return "down"
    return "ok"


def router(guard: Guard) -> APIRouter:
    """Health routes (public: they say nothing about any key)."""
    api = APIRouter(tags=["health"])

    @api.get("/healthz", summary="Liveness: the process answers")
    async def healthz() -> Health:
        return Health(status="ok")

    @api.get(
        "/readyz",
        summary="Readiness: the key store and the limiter answer",
        responses={503: {"model": Readiness, "description": "A store is down"}},
    )
    async def readyz() -> JSONResponse:
        checks = {"keys": await _probe(guard.backends.keys.alist(KeyQuery(limit=1)))}
        limiter = guard.backends.limiter
        if limiter is not None:
            checks["limits"] = await _probe(limiter.apeek("keyguard-readyz", _PROBE))
        ready = all(v == "ok" for v in checks.values())
        body = Readiness(status="ok" if ready else "unavailable", checks=checks)
        return JSONResponse(body.model_dump(), status_code=200 if ready else 503)

    return api
