"""Records to and from JSON: one spelling for every backend, the CLI and the APIs.

``public_dict`` is what users see (no digests); ``storage_dict`` adds the digests
and is only ever written to a key store.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, cast

from .errors import StorageError
from .records import JSON, AuditEvent, KeyRecord, LimitOverrides, SecretDigest

__all__ = [
    "audit_from_dict",
    "audit_to_dict",
    "isoformat",
    "public_dict",
    "record_from_storage",
    "storage_dict",
]


def isoformat(moment: datetime | None) -> str | None:
    """ISO-8601 with a ``Z`` for UTC, or ``None``."""
    if moment is None:
        return None
    return moment.isoformat().replace("+00:00", "Z")


def _moment(value: object) -> datetime | None:
    if value is None:
        return None
    return datetime.fromisoformat(cast(str, value))


def public_dict(record: KeyRecord, *, now: datetime | None = None) -> dict[str, JSON]:
    """The record as JSON for people and scripts; ``status`` is added when ``now`` is."""
    out: dict[str, JSON] = {
        "id": record.id,
        "name": record.name,
        "hint": record.hint,
        "owner": record.owner,
        "scopes": list(record.scopes),
        "plan": record.plan,
        "limits": {
            "rate": record.limits.rate,
            "quota_daily": record.limits.quota_daily,
            "quota_monthly": record.limits.quota_monthly,
            "concurrency": record.limits.concurrency,
        },
        "ip_allow": list(record.ip_allow),
        "expires_at": isoformat(record.expires_at),
        "created_at": isoformat(record.created_at),
        "updated_at": isoformat(record.updated_at),
        "last_used_at": isoformat(record.last_used_at),
        "revoked_at": isoformat(record.revoked_at),
        "revoked_reason": record.revoked_reason,
        "metadata": dict(record.metadata),
    }
    if now is not None:
        out["status"] = str(record.status(now))
    return out


def storage_dict(record: KeyRecord) -> dict[str, JSON]:
    """The full record, digests included, for a key store."""
    out = public_dict(record)
    out["digests"] = [
        {"digest": d.digest, "valid_until": isoformat(d.valid_until)} for d in record.digests
    ]
    return out


def record_from_storage(data: Mapping[str, Any]) -> KeyRecord:
    """The inverse of :func:`storage_dict`; a damaged row is a :class:`StorageError`."""
    try:
        limits = data["limits"]
        return KeyRecord(
            id=data["id"],
            name=data["name"],
            hint=data["hint"],
            digests=tuple(
                SecretDigest(d["digest"], _moment(d["valid_until"])) for d in data["digests"]
            ),
            created_at=cast(datetime, _moment(data["created_at"])),
            updated_at=cast(datetime, _moment(data["updated_at"])),
            owner=data["owner"],
            scopes=tuple(data["scopes"]),
            plan=data["plan"],
            limits=LimitOverrides(
                rate=limits["rate"],
                quota_daily=limits["quota_daily"],
                quota_monthly=limits["quota_monthly"],
                concurrency=limits["concurrency"],
            ),
            ip_allow=tuple(data["ip_allow"]),
            expires_at=_moment(data["expires_at"]),
            last_used_at=_moment(data["last_used_at"]),
            revoked_at=_moment(data["revoked_at"]),
            revoked_reason=data["revoked_reason"],
            metadata=data["metadata"],
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise StorageError("a stored key record is damaged") from exc


def audit_to_dict(event: AuditEvent) -> dict[str, JSON]:
    return {
        "at": isoformat(event.at),
        "actor": event.actor,
        "action": event.action,
        "key_id": event.key_id,
        "details": dict(event.details),
    }


def audit_from_dict(data: Mapping[str, Any]) -> AuditEvent:
    try:
        return AuditEvent(
            at=cast(datetime, _moment(data["at"])),
            actor=data["actor"],
            action=data["action"],
            key_id=data["key_id"],
            details=data["details"],
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise StorageError("a stored audit event is damaged") from exc
