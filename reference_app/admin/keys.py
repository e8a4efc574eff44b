"""``/v1/keys``: create, list, read, update, revoke and rotate keys.

Every operation goes through keyguard's public :class:`~keyguard.AsyncKeyManager`, so
each change lands in the audit trail naming the calling key. The tenant rules are in
:mod:`reference_app.admin.access`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Annotated, Literal

from fastapi import APIRouter, Query

from keyguard import (
    UNSET,
    Identity,
    InvalidInput,
    KeyChanges,
    KeyNotFound,
    KeyRecord,
    LimitOverrides,
)

from ..catalogue import SELF_SCOPE
from ..context import Context
from ..errors import ERRORS, ApiError
from .access import Actor, load_actor, not_found
from .schemas import IssuedOut, KeyOut, KeyPageOut, KeyUpdate, NewKey, RevokeIn, RotateIn

__all__ = ["router"]


def _now() -> datetime:
    return datetime.now(UTC)


@asynccontextmanager
async def manager_errors() -> AsyncIterator[None]:
    """The manager's refusals as API errors: 400 naming the field, 404 for no key."""
    try:
        yield
    except InvalidInput as exc:
        raise ApiError(400, "invalid_value", exc.reason[:200], param=exc.field) from None
    except KeyNotFound:
        raise not_found() from None


def router(ctx: Context) -> APIRouter:
    """The key routes."""
    api = APIRouter(prefix="/v1/keys", tags=["keys"], responses=ERRORS)
    _creating_and_reading(api, ctx)
    _changing(api, ctx)
    return api


async def _visible(ctx: Context, actor: Actor, key_id: str) -> KeyRecord:
    async with manager_errors():
        return actor.visible(await ctx.manager.get(key_id))


def _creating_and_reading(api: APIRouter, ctx: Context) -> None:
    caller = ctx.caller(SELF_SCOPE)
    plans = ctx.settings.plan_table()
    default_plan = ctx.settings.default_plan

    @api.post("", summary="Create a key", status_code=201)
    async def create(body: NewKey, identity: Identity = caller) -> IssuedOut:
        actor = await load_actor(ctx.manager, identity)
        owner = actor.owner_for_new_key(body.owner)
        actor.check_scopes(body.scopes)
        limits = body.limits.overrides() if body.limits is not None else None
        plan = body.plan or (actor.record.plan if not actor.admin else default_plan)
        actor.check_limits(plans, plan, limits or LimitOverrides(), default_plan)
        async with manager_errors():
            issued = await ctx.manager.create(
                body.name,
                owner=owner,
                scopes=body.scopes,
                plan=plan,
                limits=limits,
                ip_allow=body.ip_allow,
                expires=body.expires_in,
                metadata=body.metadata,
                actor=actor.name,
            )
        return IssuedOut(key=issued.key.reveal(), record=KeyOut.of(issued.record, _now()))

    @api.get("", summary="List keys")
    async def list_keys(
        identity: Identity = caller,
        owner: Annotated[str | None, Query(max_length=200)] = None,
        status: Literal["active", "expired", "revoked"] | None = None,
        after: Annotated[str | None, Query(max_length=64)] = None,
        limit: Annotated[int, Query(ge=1, le=100)] = 50,
    ) -> KeyPageOut:
        actor = await load_actor(ctx.manager, identity)
        now = _now()
        if not actor.admin:
            if identity.owner is None:  # sees only itself
                mine = [actor.record] if status in (None, str(actor.record.status(now))) else []
                return KeyPageOut(data=[KeyOut.of(r, now) for r in mine], next_cursor=None)
            if owner is not None and owner != identity.owner:
                return KeyPageOut(data=[], next_cursor=None)
            owner = identity.owner
        async with manager_errors():
            page = await ctx.manager.list(owner=owner, status=status, after=after, limit=limit)
        return KeyPageOut(
            data=[KeyOut.of(r, now) for r in page.items], next_cursor=page.next_cursor
        )

    @api.get("/{key_id}", summary="Read a key")
    async def read(key_id: str, identity: Identity = caller) -> KeyOut:
        actor = await load_actor(ctx.manager, identity)
        return KeyOut.of(await _visible(ctx, actor, key_id), _now())


def _changing(api: APIRouter, ctx: Context) -> None:
    caller = ctx.caller(SELF_SCOPE)
    plans = ctx.settings.plan_table()
    default_plan = ctx.settings.default_plan

    @api.patch("/{key_id}", summary="Change a key")
    async def update(key_id: str, body: KeyUpdate, identity: Identity = caller) -> KeyOut:
        actor = await load_actor(ctx.manager, identity)
        record = await _visible(ctx, actor, key_id)
        given = body.model_fields_set
        if "owner" in given and not actor.admin:
            raise ApiError(403, "owner_not_allowed", "Only an admin moves a key.", param="owner")
        if body.never_expires and body.expires_in is not None:
            raise ApiError(
                400, "invalid_value", "Give expires_in or never_expires, not both.",
                param="never_expires",
            )  # fmt: skip
        if body.scopes is not None:
            actor.check_scopes(body.scopes)
        if body.plan is not None or body.limits is not None:
            limits = body.limits.overrides() if body.limits is not None else record.limits
            actor.check_limits(plans, body.plan or record.plan, limits, default_plan)
        changes = KeyChanges(
            name=body.name if body.name is not None else UNSET,
            owner=body.owner if "owner" in given else UNSET,
            scopes=tuple(body.scopes) if body.scopes is not None else UNSET,
            plan=body.plan if body.plan is not None else UNSET,
            limits=body.limits.overrides() if body.limits is not None else UNSET,
            ip_allow=tuple(body.ip_allow) if body.ip_allow is not None else UNSET,
            metadata=dict(body.metadata) if body.metadata is not None else UNSET,
            expires_at=None if body.never_expires else UNSET,
        )
        async with manager_errors():
            updated = await ctx.manager.update(
                record.id, changes, expires=body.expires_in, actor=actor.name
            )
        return KeyOut.of(updated, _now())

    @api.post("/{key_id}/revoke", summary="Revoke a key, at once")
    async def revoke(
        key_id: str, body: RevokeIn | None = None, identity: Identity = caller
    ) -> KeyOut:
        actor = await load_actor(ctx.manager, identity)
        record = await _visible(ctx, actor, key_id)
        reason = body.reason if body is not None else ""
        async with manager_errors():
            revoked = await ctx.manager.revoke(record.id, reason=reason, actor=actor.name)
        return KeyOut.of(revoked, _now())

    @api.post("/{key_id}/rotate", summary="Rotate a key's secret")
    async def rotate(
        key_id: str, body: RotateIn | None = None, identity: Identity = caller
    ) -> IssuedOut:
        actor = await load_actor(ctx.manager, identity)
        record = await _visible(ctx, actor, key_id)
        seconds = body.grace_seconds if body is not None else None
        grace = None if seconds is None else timedelta(seconds=seconds)
        async with manager_errors():
            issued = await ctx.manager.rotate(record.id, grace=grace, actor=actor.name)
        return IssuedOut(key=issued.key.reveal(), record=KeyOut.of(issued.record, _now()))
