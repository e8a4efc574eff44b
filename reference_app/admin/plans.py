"""``/v1/plans``: the plans a key can be on, and what each allows."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel

from keyguard import Identity

from ..catalogue import SELF_SCOPE
from ..context import Context
from ..errors import ERRORS, ApiError

__all__ = ["router"]


class PlanOut(BaseModel):
    name: str
    object: str = "plan"
    rate: str | None
    quota_daily: int | None
    quota_monthly: int | None
    concurrency: int | None
    default: bool


class PlanList(BaseModel):
    object: str = "list"
    data: list[PlanOut]


def router(ctx: Context) -> APIRouter:
    """The plan routes (read-only: plans are configuration)."""
    api = APIRouter(prefix="/v1/plans", tags=["plans"], responses=ERRORS)
    needs_self_scope = ctx.caller(SELF_SCOPE)
    default = ctx.settings.default_plan
    plans = [
        PlanOut(
            name=p.name,
            rate=p.rate,
            quota_daily=p.quota_daily,
            quota_monthly=p.quota_monthly,
            concurrency=p.concurrency,
            default=p.name == default,
        )
        for p in ctx.settings.plan_table().values()
    ]
    by_name = {p.name: p for p in plans}

    @api.get("", summary="List plans")
    async def list_plans(identity: Identity = needs_self_scope) -> PlanList:
        return PlanList(data=plans)

    @api.get("/{name}", summary="Read a plan")
    async def read(name: str, identity: Identity = needs_self_scope) -> PlanOut:
        if name not in by_name:
            raise ApiError(404, "plan_not_found", "No such plan.", param="name")
        return by_name[name]

    return api
