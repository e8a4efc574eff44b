"""``/v1/quota-requests``: a key asks for more; an admin approves or declines.

Approval writes the requested limits over the key's own (through the key manager,
so the audit trail names the approving key); the plan is left alone.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from keyguard import Identity, KeyChanges, LimitOverrides

from ..catalogue import ADMIN_SCOPE, SELF_SCOPE
from ..context import Context
from ..conversations import tenant_of
from ..errors import ERRORS, ApiError
from .access import load_actor, validated_limits
from .keys import manager_errors
from .quota_book import QuotaRequest
from .schemas import LimitsIn, LimitsOut

__all__ = ["router"]


class NewQuotaRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key_id: Annotated[str, Field(max_length=64)] | None = None
    limits: LimitsIn
    reason: Annotated[str, Field(max_length=1000)] = ""


class Decision(BaseModel):
    model_config = ConfigDict(extra="forbid")

    note: Annotated[str, Field(max_length=1000)] | None = None


class QuotaRequestOut(BaseModel):
    id: str
    object: str = "quota_request"
    key_id: str
    limits: LimitsOut
    reason: str
    status: Literal["pending", "approved", "declined"]
    created_at: datetime
    decided_at: datetime | None
    decided_by: str | None
    note: str | None

    @classmethod
    def of(cls, request: QuotaRequest) -> QuotaRequestOut:
        limits = request.limits
        return cls(
            id=request.id,
            key_id=request.key_id,
            limits=LimitsOut(
                rate=limits.rate,
                quota_daily=limits.quota_daily,
                quota_monthly=limits.quota_monthly,
                concurrency=limits.concurrency,
            ),
            reason=request.reason,
            status=request.status,
            created_at=request.created_at,
            decided_at=request.decided_at,
            decided_by=request.decided_by,
            note=request.note,
        )


class QuotaRequestList(BaseModel):
    object: str = "list"
    data: list[QuotaRequestOut]


def _merged(current: LimitOverrides, asked: LimitOverrides) -> LimitOverrides:
    """The key's overrides with every value the request names replaced."""
    return LimitOverrides(
        asked.rate if asked.rate is not None else current.rate,
        asked.quota_daily if asked.quota_daily is not None else current.quota_daily,
        asked.quota_monthly if asked.quota_monthly is not None else current.quota_monthly,
        asked.concurrency if asked.concurrency is not None else current.concurrency,
    )


def router(ctx: Context) -> APIRouter:
    """The quota-request routes."""
    api = APIRouter(prefix="/v1/quota-requests", tags=["quota requests"], responses=ERRORS)
    caller = ctx.caller(SELF_SCOPE)
    book = ctx.quota_requests

    def missing() -> ApiError:
        return ApiError(404, "not_found", "No such quota request.", param="request_id")

    def seen_by(identity: Identity, request_id: str, admin: bool) -> QuotaRequest:
        found = book.get(request_id)
        if found is None or not (admin or found.tenant == tenant_of(identity)):
            raise missing()
        return found

    @api.post("", summary="Ask for higher limits", status_code=201)
    async def create(body: NewQuotaRequest, identity: Identity = caller) -> QuotaRequestOut:
        actor = await load_actor(ctx.manager, identity)
        key_id = body.key_id or identity.key_id
        async with manager_errors():
            record = actor.visible(await ctx.manager.get(key_id))
        asked = validated_limits(body.limits.overrides())
        if asked == LimitOverrides():
            raise ApiError(400, "invalid_value", "Ask for at least one limit.", param="limits")
        tenant = record.owner if record.owner is not None else "key:" + record.id
        return QuotaRequestOut.of(book.add(record.id, tenant, asked, body.reason))

    @api.get("", summary="List quota requests")
    async def list_requests(
        identity: Identity = caller,
        status: Literal["pending", "approved", "declined"] | None = None,
    ) -> QuotaRequestList:
        actor = await load_actor(ctx.manager, identity)
        found = book.list(None if actor.admin else tenant_of(identity))
        data = [QuotaRequestOut.of(r) for r in found if status is None or r.status == status]
        return QuotaRequestList(data=data)

    @api.get("/{request_id}", summary="Read a quota request")
    async def read(request_id: str, identity: Identity = caller) -> QuotaRequestOut:
        actor = await load_actor(ctx.manager, identity)
        return QuotaRequestOut.of(seen_by(identity, request_id, actor.admin))

    async def decide(
        identity: Identity,
        request_id: str,
        status: Literal["approved", "declined"],
        note: str | None,
    ) -> QuotaRequestOut:
        actor = await load_actor(ctx.manager, identity)
        if not actor.admin:
            message = f"Deciding needs the {ADMIN_SCOPE} scope."
            raise ApiError(403, "insufficient_permissions", message, param="scope")
        found = seen_by(identity, request_id, admin=True)
        if found.status != "pending":
            raise ApiError(409, "already_decided", "The request was decided already.")
        if status == "approved":
            async with manager_errors():
                record = await ctx.manager.get(found.key_id)
                limits = _merged(record.limits, found.limits)
                await ctx.manager.update(record.id, KeyChanges(limits=limits), actor=actor.name)
        return QuotaRequestOut.of(book.decide(found, status, actor.name, note))

    @api.post("/{request_id}/approve", summary="Approve: the key's limits change (admin)")
    async def approve(
        request_id: str, body: Decision | None = None, identity: Identity = caller
    ) -> QuotaRequestOut:
        return await decide(identity, request_id, "approved", body.note if body else None)

    @api.post("/{request_id}/decline", summary="Decline (admin)")
    async def decline(
        request_id: str, body: Decision | None = None, identity: Identity = caller
    ) -> QuotaRequestOut:
        return await decide(identity, request_id, "declined", body.note if body else None)

    return api
