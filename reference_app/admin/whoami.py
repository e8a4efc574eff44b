"""``/v1/whoami``: the calling key as the server sees it, never its secret."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel

from keyguard import Identity

from ..catalogue import SELF_SCOPE
from ..context import Context
from ..errors import ERRORS

__all__ = ["router"]


class WhoAmI(BaseModel):
    id: str
    name: str
    owner: str | None
    scopes: list[str]
    plan: str
    auth_method: str


def router(ctx: Context) -> APIRouter:
    api = APIRouter(prefix="/v1", tags=["keys"], responses=ERRORS)
    needs_self_scope = ctx.caller(SELF_SCOPE)

    @api.get("/whoami", summary="The calling key")
    async def whoami(identity: Identity = needs_self_scope) -> WhoAmI:
        return WhoAmI(
            id=identity.key_id,
            name=identity.name,
            owner=identity.owner,
            scopes=list(identity.scopes),
            plan=identity.plan,
            auth_method=identity.auth_method,
        )

    return api
