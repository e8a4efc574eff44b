"""``/v1/keys/{id}/usage``, ``/v1/keys/{id}/errors`` and ``/v1/usage``: what keys did.

Read through keyguard's public :class:`~keyguard.usage.UsageReader` on the guard's
usage store, and the live limit state through the limiter's ``peek`` (consuming
nothing). The tenant rules are the key API's: a ``keys:self`` caller reads only its
own owner's keys (others answer 404), and ``/v1/usage`` covers only its owner.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from keyguard import Guard, Identity, InvalidInput
from keyguard.limiting import LimitState
from keyguard.usage import UsageQuery, UsageReader
from keyguard.usage.live import alive_limits, limit_dict

from ..catalogue import SELF_SCOPE
from ..context import Context
from ..errors import ERRORS, ApiError
from .access import load_actor
from .keys import manager_errors

__all__ = ["router"]


class Range(BaseModel):
    """The time range and shape of a usage query."""

    since: str = Field("24h", max_length=32, description="a duration before now: 90m, 24h, 30d")
    until: str | None = Field(None, max_length=32, description="a duration before now")
    granularity: Literal["minute", "hour", "day"] | None = Field(
        None, description="minute, hour or day; by default chosen from the span"
    )
    by: Literal["service"] | None = Field(None, description="one series per service")

    def query(self, key_id: str | None = None, owner: str | None = None) -> UsageQuery:
        """The library's query for this range, narrowed to a key or an owner."""
        return UsageQuery(
            key_id=key_id,
            owner=owner,
            since=self.since,
            until=self.until,
            granularity=self.granularity,
            by_service=self.by == "service",
        )


class OwnerRange(Range):
    """A range over every key the caller may see, or one owner's (admins)."""

    owner: str | None = Field(None, max_length=200, description="one owner (admin keys)")


def _guard(ctx: Context) -> Guard:
    if ctx.guard is None or ctx.guard.usage is None:
        raise ApiError(404, "usage_disabled", "Usage is not recorded on this server.")
    return ctx.guard


def _reader(guard: Guard) -> UsageReader:
    assert guard.usage is not None  # checked by _guard
    return UsageReader(guard.usage.store, clock=guard.clock)


async def _summary(reader: UsageReader, query: UsageQuery) -> dict[str, Any]:
    try:
        summary = await reader.asummary(query)
    except InvalidInput as exc:
        raise ApiError(400, "invalid_value", exc.reason, param=exc.field) from None
    return summary.to_dict()


def router(ctx: Context) -> APIRouter:
    """The usage routes."""
    api = APIRouter(prefix="/v1", tags=["usage"], responses=ERRORS)
    caller = ctx.caller(SELF_SCOPE)

    @api.get("/keys/{key_id}/usage", summary="A key's usage and live limits")
    async def key_usage(
        key_id: str, shape: Annotated[Range, Query()], identity: Identity = caller
    ) -> dict[str, Any]:
        """Calls, errors, refusals, units and latency percentiles over a range, one
        point per period (zeros included), and where each window and quota stands."""
        guard = _guard(ctx)
        actor = await load_actor(ctx.manager, identity)
        async with manager_errors():
            record = actor.visible(await ctx.manager.get(key_id))
        document = {"key_id": record.id, **await _summary(_reader(guard), shape.query(record.id))}
        limits: tuple[LimitState, ...] = ()
        if guard.backends.limiter is not None:
            limits = await alive_limits(
                guard.backends.limiter,
                record,
                guard.plans,
                services=guard.services,
                default_plan=ctx.settings.default_plan,
            )
        now = guard.clock.now()
        document["limits"] = [limit_dict(state, now) for state in limits]
        return document

    @api.get("/keys/{key_id}/errors", summary="A key's recent errors")
    async def key_errors(
        key_id: str,
        limit: Annotated[int, Query(ge=1, le=1000)] = 50,
        identity: Identity = caller,
    ) -> dict[str, Any]:
        """The newest failed or refused requests first: time, route, status, code,
        message and request id (never a credential or a body)."""
        guard = _guard(ctx)
        actor = await load_actor(ctx.manager, identity)
        async with manager_errors():
            record = actor.visible(await ctx.manager.get(key_id))
        entries = await _reader(guard).aerrors(record.id, limit=limit)
        return {"key_id": record.id, "errors": [e.to_dict() for e in entries]}

    @api.get("/usage", summary="Usage of every key the caller may see")
    async def all_usage(
        shape: Annotated[OwnerRange, Query()], identity: Identity = caller
    ) -> dict[str, Any]:
        """An admin reads everything, or one ``owner``; any other key reads its own
        owner's keys (its own key alone when it has no owner)."""
        guard = _guard(ctx)
        actor = await load_actor(ctx.manager, identity)
        owner, key_id = shape.owner, None
        if not actor.admin:
            if owner is not None and owner != identity.owner:
                raise ApiError(
                    403, "owner_not_allowed", "Usage only of your own owner.", param="owner"
                )
            owner = identity.owner
            key_id = identity.key_id if owner is None else None
        return {"owner": owner, **await _summary(_reader(guard), shape.query(key_id, owner))}

    return api
