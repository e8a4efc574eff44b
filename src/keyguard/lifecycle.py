"""Pure transitions of a key record: create, update, revoke, rotate, authenticate.

Nothing here does I/O or reads a clock; the manager passes ``now`` in. That keeps
every rule about expiry, grace periods and revocation testable as plain functions.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from datetime import datetime, timedelta
from typing import Any, Final

from .errors import InvalidCredential, InvalidInput
from .keys import BASE62, base62
from .records import JSON, NO_OVERRIDES, KeyRecord, KeyStatus, LimitOverrides, SecretDigest
from .validation import (
    validate_cidrs,
    validate_label,
    validate_limits,
    validate_metadata,
    validate_plan,
    validate_scopes,
)

__all__ = [
    "UNSET",
    "KeyChanges",
    "KeySpec",
    "check_secret",
    "create_record",
    "new_key_id",
    "revoke_record",
    "rotate_record",
    "update_record",
]


class _Unset:
    """The "not given" sentinel, so ``None`` can mean "clear this field"."""

    _instance: _Unset | None = None

    def __new__(cls) -> _Unset:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNSET"

    def __bool__(self) -> bool:
        return False


UNSET: Final = _Unset()
_DUMMY_DIGEST = "0" * 64


def new_key_id(now: datetime) -> str:
    """``key_`` + a base62 millisecond timestamp + 12 random characters.

    Ids sort by creation time, which gives listings a stable order and a simple cursor.
    """
    stamp = base62(int(now.timestamp() * 1000), 8)
    return "key_" + stamp + "".join(secrets.choice(BASE62) for _ in range(12))


@dataclass(frozen=True, slots=True)
class KeySpec:
    """What a new key should be. :meth:`validated` checks and normalises every field."""

    name: str
    owner: str | None = None
    scopes: tuple[str, ...] = ()
    plan: str = "free"
    limits: LimitOverrides = NO_OVERRIDES
    ip_allow: tuple[str, ...] = ()
    expires_at: datetime | None = None
    metadata: dict[str, JSON] | None = None

    def validated(self) -> KeySpec:
        return KeySpec(
            name=validate_label("name", self.name),
            owner=None if self.owner is None else validate_label("owner", self.owner),
            scopes=validate_scopes(self.scopes),
            plan=validate_plan(self.plan),
            limits=validate_limits(self.limits),
            ip_allow=validate_cidrs(self.ip_allow),
            expires_at=self.expires_at,
            metadata=validate_metadata({} if self.metadata is None else self.metadata),
        )


@dataclass(frozen=True, slots=True)
class KeyChanges:
    """Fields to change on a key; anything left ``UNSET`` stays as it is."""

    name: str | _Unset = UNSET
    owner: str | _Unset | None = UNSET
    scopes: tuple[str, ...] | _Unset = UNSET
    plan: str | _Unset = UNSET
    limits: LimitOverrides | _Unset = UNSET
    ip_allow: tuple[str, ...] | _Unset = UNSET
    expires_at: datetime | _Unset | None = UNSET
    metadata: dict[str, JSON] | _Unset = UNSET

    def given(self) -> dict[str, object]:
        """The fields that were set, validated and normalised."""
        out: dict[str, object] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not UNSET:
                out[f.name] = _VALIDATORS[f.name](value)
        return out


_VALIDATORS: dict[str, Callable[[Any], object]] = {
    "name": lambda v: validate_label("name", v),
    "owner": lambda v: None if v is None else validate_label("owner", v),
    "scopes": validate_scopes,
    "plan": validate_plan,
    "limits": validate_limits,
    "ip_allow": validate_cidrs,
    "expires_at": lambda v: v,
    "metadata": validate_metadata,
}


def create_record(
    spec: KeySpec, *, key_id: str, digest: str, hint: str, now: datetime
) -> KeyRecord:
    """A new record for a validated spec."""
    return KeyRecord(
        id=key_id,
        name=spec.name,
        hint=hint,
        digests=(SecretDigest(digest),),
        created_at=now,
        updated_at=now,
        owner=spec.owner,
        scopes=spec.scopes,
        plan=spec.plan,
        limits=spec.limits,
        ip_allow=spec.ip_allow,
        expires_at=spec.expires_at,
        metadata=spec.metadata or {},
    )


def update_record(record: KeyRecord, changes: dict[str, object], now: datetime) -> KeyRecord:
    """The record with validated ``changes`` applied (see :meth:`KeyChanges.given`)."""
    if record.status(now) is KeyStatus.REVOKED:
        raise InvalidInput("key", "a revoked key cannot be changed")
    return replace(record, updated_at=now, **changes)  # type: ignore[arg-type]


def revoke_record(record: KeyRecord, reason: str, now: datetime) -> KeyRecord:
    """Revoked at ``now``; revoking twice keeps the first time and reason."""
    if record.revoked_at is not None:
        return record
    return replace(record, revoked_at=now, revoked_reason=reason or None, updated_at=now)


def rotate_record(
    record: KeyRecord, *, digest: str, hint: str, now: datetime, grace: timedelta
) -> KeyRecord:
    """A new current secret; the old one lives until ``now + grace`` (zero: not at all).

    Older secrets keep their own deadline, so a second rotation inside a grace period
    never extends the first one; secrets whose grace has ended are dropped.
    """
    if record.status(now) is not KeyStatus.ACTIVE:
        raise InvalidInput("key", f"a {record.status(now)} key cannot be rotated")
    if grace < timedelta(0):
        raise InvalidInput("grace", "must not be negative")
    kept = [d for d in record.digests if d.valid_until is not None and d.valid_at(now)]
    if grace > timedelta(0):
        kept.extend(
            SecretDigest(d.digest, now + grace) for d in record.digests if d.valid_until is None
        )
    return replace(record, digests=(SecretDigest(digest), *kept), hint=hint, updated_at=now)


def check_secret(record: KeyRecord | None, digest: str, now: datetime) -> KeyRecord:
    """The record if ``digest`` is one of its live secrets and the key is active.

    Every failure raises the same :class:`InvalidCredential` (only its ``reason``,
    meant for logs, differs), and an unknown key still runs one constant-time
    comparison so that it costs what a known one does.
    """
    if record is None:
        hmac.compare_digest(digest, _DUMMY_DIGEST)
        raise InvalidCredential("unknown")
    match = None
    for candidate in record.digests:
        if hmac.compare_digest(candidate.digest, digest):
            match = candidate
    if match is None:
        raise InvalidCredential("unknown")
    status = record.status(now)
    if status is not KeyStatus.ACTIVE:
        raise InvalidCredential(str(status))
    if not match.valid_at(now):
        raise InvalidCredential("rotated")
    return record
