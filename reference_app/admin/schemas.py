"""The bodies of the key API: what comes in, and keys as they go out (never a
secret, except the one ``key`` field of a create or rotate answer)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from keyguard import KeyRecord, LimitOverrides

__all__ = [
    "IssuedOut",
    "KeyOut",
    "KeyPageOut",
    "KeyUpdate",
    "LimitsIn",
    "NewKey",
    "RevokeIn",
    "RotateIn",
]

Label = Annotated[str, Field(min_length=1, max_length=200)]
Scopes = Annotated[list[Annotated[str, Field(max_length=200)]], Field(max_length=64)]
Cidrs = Annotated[list[Annotated[str, Field(max_length=64)]], Field(max_length=64)]
PlanName = Annotated[str, Field(min_length=1, max_length=64)]
Positive = Annotated[int, Field(ge=1, le=10**12)]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LimitsIn(_In):
    """Per-key overrides of the plan; ``null`` keeps the plan's value."""

    rate: Annotated[str, Field(max_length=200, examples=["30/minute;500/hour"])] | None = None
    quota_daily: Positive | None = None
    quota_monthly: Positive | None = None
    concurrency: Annotated[int, Field(ge=1, le=100_000)] | None = None

    def overrides(self) -> LimitOverrides:
        return LimitOverrides(self.rate, self.quota_daily, self.quota_monthly, self.concurrency)


class NewKey(_In):
    name: Label
    owner: Label | None = None
    scopes: Scopes = Field(default_factory=list)
    plan: PlanName | None = None
    limits: LimitsIn | None = None
    ip_allow: Cidrs = Field(default_factory=list)
    expires_in: Annotated[str, Field(max_length=32, examples=["30d"])] | None = None
    metadata: dict[str, JsonValue] | None = None

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"name": "ci", "scopes": ["text:generate"], "plan": "free", "expires_in": "30d"}
            ]
        },
    )


class KeyUpdate(_In):
    name: Label | None = None
    owner: Label | None = None
    scopes: Scopes | None = None
    plan: PlanName | None = None
    limits: LimitsIn | None = None
    ip_allow: Cidrs | None = None
    expires_in: Annotated[str, Field(max_length=32)] | None = None
    never_expires: Annotated[bool, Field(description="true: clear the expiry")] = False
    metadata: dict[str, JsonValue] | None = None


class RevokeIn(_In):
    reason: Annotated[str, Field(max_length=200)] = ""


class RotateIn(_In):
    grace_seconds: Annotated[int, Field(ge=0, le=30 * 86_400)] | None = None


class LimitsOut(BaseModel):
    rate: str | None
    quota_daily: int | None
    quota_monthly: int | None
    concurrency: int | None


class KeyOut(BaseModel):
    id: str
    object: str = "api_key"
    name: str
    owner: str | None
    hint: str
    scopes: list[str]
    plan: str
    limits: LimitsOut
    ip_allow: list[str]
    status: str
    created_at: datetime
    updated_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None
    revoked_at: datetime | None
    revoked_reason: str | None
    metadata: dict[str, JsonValue]

    @classmethod
    def of(cls, record: KeyRecord, now: datetime) -> KeyOut:
        limits = record.limits
        return cls(
            id=record.id,
            name=record.name,
            owner=record.owner,
            hint=record.hint,
            scopes=list(record.scopes),
            plan=record.plan,
            limits=LimitsOut(
                rate=limits.rate,
                quota_daily=limits.quota_daily,
                quota_monthly=limits.quota_monthly,
                concurrency=limits.concurrency,
            ),
            ip_allow=list(record.ip_allow),
            status=str(record.status(now)),
            created_at=record.created_at,
            updated_at=record.updated_at,
            expires_at=record.expires_at,
            last_used_at=record.last_used_at,
            revoked_at=record.revoked_at,
            revoked_reason=record.revoked_reason,
            metadata=dict(record.metadata),
        )


class IssuedOut(BaseModel):
    """A key with its secret: shown in this one answer and never again."""

    key: str
    record: KeyOut


class KeyPageOut(BaseModel):
    object: str = "list"
    data: list[KeyOut]
    next_cursor: str | None
