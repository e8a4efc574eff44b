"""The key record and the values it is made of.

Records are frozen: every change produces a new record (see :mod:`keyguard.lifecycle`),
so a record read by one request can never change under it.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TypeAlias

__all__ = [
    "JSON",
    "NO_OVERRIDES",
    "AuditEvent",
    "KeyPage",
    "KeyQuery",
    "KeyRecord",
    "KeyStatus",
    "LimitOverrides",
    "SecretDigest",
]

JSON: TypeAlias = "bool | int | float | str | list[JSON] | dict[str, JSON] | None"


class KeyStatus(enum.StrEnum):
    """Where a key stands at a given moment."""

    ACTIVE = "active"
    EXPIRED = "expired"
    REVOKED = "revoked"


@dataclass(frozen=True, slots=True)
class SecretDigest:
    """The digest of one secret of a key.

    ``valid_until`` is ``None`` for the current secret and the end of the rotation
    grace period for a previous one.
    """

    digest: str
    valid_until: datetime | None = None

    def valid_at(self, now: datetime) -> bool:
        return self.valid_until is None or now < self.valid_until


@dataclass(frozen=True, slots=True)
class LimitOverrides:
    """Per-key limits that replace the plan's; ``None`` means "use the plan's"."""

    rate: str | None = None
    quota_daily: int | None = None
    quota_monthly: int | None = None
    concurrency: int | None = None

    def is_empty(self) -> bool:
        return self == NO_OVERRIDES


NO_OVERRIDES = LimitOverrides()


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """Everything keyguard knows about a key, except the key itself."""

    id: str
    name: str
    hint: str
    digests: tuple[SecretDigest, ...]
    created_at: datetime
    updated_at: datetime
    owner: str | None = None
    scopes: tuple[str, ...] = ()
    plan: str = "free"
    limits: LimitOverrides = NO_OVERRIDES
    ip_allow: tuple[str, ...] = ()
    expires_at: datetime | None = None
    last_used_at: datetime | None = None
    revoked_at: datetime | None = None
    revoked_reason: str | None = None
    metadata: Mapping[str, JSON] = field(default_factory=dict)

    def status(self, now: datetime) -> KeyStatus:
        """Revoked wins over expired: a revocation is a deliberate act worth reporting."""
        if self.revoked_at is not None and self.revoked_at <= now:
            return KeyStatus.REVOKED
        if self.expires_at is not None and now >= self.expires_at:
            return KeyStatus.EXPIRED
        return KeyStatus.ACTIVE


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One entry of the audit trail: who did what to which key, and when.

    ``details`` holds the changed field names and safe values; never a secret or digest.
    """

    at: datetime
    actor: str
    action: str
    key_id: str
    details: Mapping[str, JSON] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class KeyQuery:
    """A filter and a page position for listing keys, oldest first."""

    owner: str | None = None
    status: KeyStatus | None = None
    plan: str | None = None
    after: str | None = None
    limit: int = 100
    now: datetime | None = None

    def __post_init__(self) -> None:
        if self.limit < 1:
            raise ValueError("a page holds at least one record")
        if self.status is not None and self.now is None:
            raise ValueError("a status filter needs the time it applies at")


@dataclass(frozen=True, slots=True)
class KeyPage:
    """One page of a listing; pass ``next_cursor`` as ``KeyQuery.after`` for the next."""

    items: tuple[KeyRecord, ...]
    next_cursor: str | None
