"""``/v1/alerts/settings`` and ``/v1/alerts/deliveries``: each owner's alert webhooks
and quota thresholds, and the recent deliveries to them.

Backed by the :class:`keyguard.alerts.Alerts` the app factory wires to the usage
recorder and the key manager (``app.state.alerts``). The tenant rules are the usage
API's: an admin names any ``owner``; a ``keys:self`` key reads and changes only its
own owner's settings (another owner is ``403``), and a key without an owner has no
alert settings.

**Security note**: a webhook secret is write-only. When a webhook is saved without
one, the server keeps the secret of the webhook already at that URL or makes a new
one, which is returned in ``new_secrets`` of that answer only. Owner webhooks may not
target private addresses (SSRF, see ``docs/alerts.md``).
"""

from __future__ import annotations

import secrets
from dataclasses import replace
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from keyguard import ConfigurationError, Identity
from keyguard.alerts import AlertKind, AlertRules, Alerts, DeliveryRecord, OwnerAlerts, Webhook

from ..catalogue import SELF_SCOPE
from ..context import Context
from ..errors import ERRORS, ApiError
from .access import Actor, load_actor

__all__ = ["router"]

OwnerQuery = Annotated[str | None, Query(max_length=200, description="one owner (admin keys)")]
Share = Annotated[float, Field(gt=0, le=1)]
Days = Annotated[float, Field(gt=0, le=3650)]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WebhookIn(_In):
    url: Annotated[str, Field(min_length=1, max_length=2000, examples=["https://example.com/h"])]
    secret: Annotated[str, Field(min_length=16, max_length=200)] | None = Field(
        None, description="omit to keep this URL's current secret, or to get a new one"
    )
    kinds: Annotated[list[AlertKind], Field(max_length=len(AlertKind))] = Field(
        default_factory=list, description="what to send; empty: every kind"
    )


class RulesIn(_In):
    quota_thresholds: Annotated[list[Share], Field(max_length=10, examples=[[0.8, 1.0]])]
    expiry_days: Annotated[list[Days], Field(max_length=10, examples=[[7, 1]])]


class AlertSettingsIn(_In):
    webhooks: Annotated[list[WebhookIn], Field(max_length=5)] = Field(default_factory=list)
    rules: RulesIn | None = Field(None, description="null: the server's defaults")


class WebhookOut(BaseModel):
    url: str
    target: str
    kinds: list[str]
    secret_set: bool = True


class RulesOut(BaseModel):
    quota_thresholds: list[float]
    expiry_days: list[float]

    @classmethod
    def of(cls, rules: AlertRules) -> RulesOut:
        return cls(
            quota_thresholds=list(rules.quota_thresholds), expiry_days=list(rules.expiry_days)
        )


class NewSecret(BaseModel):
    url: str
    secret: str


class AlertSettingsOut(BaseModel):
    object: str = "alert_settings"
    owner: str
    webhooks: list[WebhookOut]
    rules: RulesOut | None
    defaults: RulesOut
    kinds: list[str]
    new_secrets: list[NewSecret] = Field(default_factory=list)


class DeliveryOut(BaseModel):
    event_id: str
    kind: str
    key_id: str
    target: str
    at: datetime
    status: str
    attempts: int
    http_status: int | None
    error: str | None

    @classmethod
    def of(cls, record: DeliveryRecord) -> DeliveryOut:
        return cls(
            event_id=record.event_id,
            kind=record.kind.value,
            key_id=record.key_id,
            target=record.target,
            at=datetime.fromtimestamp(record.at, UTC),
            status=record.status.value,
            attempts=record.attempts,
            http_status=record.http_status,
            error=record.error,
        )


class DeliveriesOut(BaseModel):
    object: str = "list"
    owner: str | None
    data: list[DeliveryOut]


def _alerts(request: Request) -> Alerts:
    alerts = getattr(request.app.state, "alerts", None)
    if not isinstance(alerts, Alerts):
        raise ApiError(404, "alerts_disabled", "Alerts are not configured on this server.")
    return alerts


def _owner(actor: Actor, asked: str | None) -> str | None:
    """The owner a caller may address: any for an admin, else only its own."""
    own = actor.identity.owner
    if actor.admin:
        return asked if asked is not None else own
    if asked is not None and asked != own:
        raise ApiError(403, "owner_not_allowed", "Alerts only of your own owner.", param="owner")
    return own


def _target(url: str) -> str:
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0].rpartition('@')[2]}"


def _settings_out(alerts: Alerts, owner: str, made: list[NewSecret]) -> AlertSettingsOut:
    current = alerts.owners.get(owner)
    return AlertSettingsOut(
        owner=owner,
        webhooks=[
            WebhookOut(url=h.url, target=_target(h.url), kinds=sorted(k.value for k in h.kinds))
            for h in current.webhooks
        ],
        rules=None if current.rules is None else RulesOut.of(current.rules),
        defaults=RulesOut.of(alerts.config.rules),
        kinds=[kind.value for kind in AlertKind],
        new_secrets=made,
    )


def _webhooks(
    asked: list[WebhookIn], before: OwnerAlerts, made: list[NewSecret]
) -> tuple[Webhook, ...]:
    kept = {hook.url: hook.secret for hook in before.webhooks}
    hooks = []
    for hook in asked:
        secret = hook.secret or kept.get(hook.url)
        if secret is None:
            secret = "whsec_" + secrets.token_urlsafe(32)
            made.append(NewSecret(url=hook.url, secret=secret))
        hooks.append(Webhook(hook.url, secret, kinds=frozenset(hook.kinds)))
    return tuple(hooks)


def router(ctx: Context) -> APIRouter:
    """The alert routes."""
    api = APIRouter(prefix="/v1/alerts", tags=["alerts"], responses=ERRORS)
    caller = ctx.caller(SELF_SCOPE)

    async def owner_of(identity: Identity, asked: str | None) -> str:
        owner = _owner(await load_actor(ctx.manager, identity), asked)
        if owner is None:
            raise ApiError(400, "owner_required", "A key without an owner has no alerts.")
        return owner

    @api.get("/settings", summary="An owner's alert webhooks and thresholds")
    async def read_settings(
        request: Request, owner: OwnerQuery = None, identity: Identity = caller
    ) -> AlertSettingsOut:
        """The caller's owner (an admin may name any ``owner``); secrets are never shown."""
        alerts = _alerts(request)
        return _settings_out(alerts, await owner_of(identity, owner), [])

    @api.put("/settings", summary="Replace an owner's alert webhooks and thresholds")
    async def write_settings(
        request: Request,
        body: AlertSettingsIn,
        owner: OwnerQuery = None,
        identity: Identity = caller,
    ) -> AlertSettingsOut:
        """A webhook without ``secret`` keeps its URL's secret or gets a new one, shown
        in ``new_secrets`` of this answer only."""
        alerts = _alerts(request)
        name = await owner_of(identity, owner)
        made: list[NewSecret] = []
        try:
            hooks = _webhooks(body.webhooks, alerts.owners.get(name), made)
            rules = None
            if body.rules is not None:
                rules = replace(
                    alerts.config.rules,
                    quota_thresholds=tuple(body.rules.quota_thresholds),
                    expiry_days=tuple(body.rules.expiry_days),
                )
            alerts.owners.set(name, OwnerAlerts(webhooks=hooks, rules=rules))
        except ConfigurationError as exc:
            message = str(exc).removeprefix("alerts: ")[:200]
            raise ApiError(400, "invalid_value", message, param="webhooks") from None
        return _settings_out(alerts, name, made)

    @api.get("/deliveries", summary="Recent webhook deliveries")
    async def deliveries(
        request: Request, owner: OwnerQuery = None, identity: Identity = caller
    ) -> DeliveriesOut:
        """Newest first: the caller's owner's webhooks; an admin without ``owner``
        reads the operator's own webhooks. A target is a scheme and host, never a path."""
        alerts = _alerts(request)
        actor = await load_actor(ctx.manager, identity)
        name = owner if actor.admin else await owner_of(identity, owner)
        records = alerts.deliveries(name)
        return DeliveriesOut(owner=name, data=[DeliveryOut.of(r) for r in records])

    return api
