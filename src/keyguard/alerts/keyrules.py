"""Rules about keys rather than requests: expiring soon, expired, and the lifecycle
changes the key manager reports (created, rotated, revoked).

Details come from an allow-list of record fields: never the digests, the hint (a
piece of the key), the metadata (free-form, may hold anything) or the audit details.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..records import JSON, AuditEvent, KeyRecord
from .bounded import Bounded
from .model import Alert, AlertKind
from .rules import DAY, iso

__all__ = ["ExpiryWatch", "lifecycle_alert"]

_LIFECYCLE = {"create": AlertKind.CREATED, "rotate": AlertKind.ROTATED, "revoke": AlertKind.REVOKED}


def _described(record: KeyRecord) -> dict[str, JSON]:
    expires = None if record.expires_at is None else iso(record.expires_at.timestamp())
    return {
        "name": record.name,
        "plan": record.plan,
        "scopes": [*record.scopes],
        "expires_at": expires,
    }


def lifecycle_alert(event: AuditEvent, record: KeyRecord) -> Alert | None:
    """The alert for a stored key change, or ``None`` for changes not alerted on."""
    kind = _LIFECYCLE.get(event.action)
    if kind is None:
        return None
    details = _described(record)
    details["actor"] = event.actor
    if kind is AlertKind.ROTATED:
        ends = [d.valid_until for d in record.digests if d.valid_until is not None]
        details["previous_valid_until"] = iso(max(ends).timestamp()) if ends else None
    elif kind is AlertKind.REVOKED:
        details["reason"] = record.revoked_reason or ""
    return Alert(kind, record.id, record.owner, event.at.timestamp(), details)


@dataclass(slots=True)
class _Expiry:
    expires_at: float
    warned: float | None = None  # the smallest threshold (days) already sent
    expired: bool = False


class ExpiryWatch:
    """Warns once per key, expiry date and threshold; reports expiry once per key.

    Changing a key's expiry starts afresh. When a check finds a key past several
    thresholds at once, only the nearest is sent. ``lookback`` keeps a scan after a
    restart from re-announcing keys that expired long ago.
    """

    def __init__(self, max_keys: int, lookback: float) -> None:
        self._keys: Bounded[str, _Expiry] = Bounded(max_keys)
        self.lookback = lookback

    def check(
        self, record: KeyRecord, now: float, days: tuple[float, ...], *, expired: bool
    ) -> list[Alert]:
        if record.revoked_at is not None or record.expires_at is None:
            return []
        ends = record.expires_at.timestamp()
        state = self._keys.get(record.id)
        if state is None or state.expires_at != ends:
            state = _Expiry(ends)
            self._keys.put(record.id, state)
        left = ends - now
        details = _described(record)
        if left <= 0:
            if not expired or state.expired or now - ends > self.lookback:
                return []
            state.expired = True
            return [Alert(AlertKind.EXPIRED, record.id, record.owner, now, details)]
        nearest = min((d for d in days if left <= d * DAY), default=None)
        if nearest is None or (state.warned is not None and nearest >= state.warned):
            return []
        state.warned = nearest
        details["threshold_days"] = nearest
        details["days_left"] = round(left / DAY, 2)
        return [Alert(AlertKind.EXPIRING, record.id, record.owner, now, details)]

    def forget(self, key_id: str) -> None:
        self._keys.pop(key_id)
