"""What an alert is: a kind, the key it concerns, when, and a few safe details.

An alert leaves the process (webhooks, callbacks that page someone), so it is built
from an allow-list of values: never a secret, a digest, a key hint, a credential, a
route or a query string. The client IP appears in one kind only, ``activity.new_ip``,
because it *is* the news there (SECURITY.md C7).
"""

from __future__ import annotations

import enum
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..clock import from_timestamp
from ..records import JSON

__all__ = ["Alert", "AlertKind"]


class AlertKind(enum.StrEnum):
    """Every kind of alert; the value is the ``kind`` field of a webhook body."""

    QUOTA = "quota.threshold"
    EXPIRING = "key.expiring"
    ERROR_RATE = "usage.error_rate"
    NEW_IP = "activity.new_ip"
    BURST = "activity.burst"
    CREATED = "key.created"
    ROTATED = "key.rotated"
    REVOKED = "key.revoked"
    EXPIRED = "key.expired"


def _new_id() -> str:
    return "evt_" + uuid.uuid4().hex


@dataclass(frozen=True, slots=True)
class Alert:
    """One thing worth telling a key's owner or the operator.

    ``id`` is unique per alert and stays the same across webhook retries, so a
    receiver can drop duplicates. ``at`` is epoch seconds (UTC): the time of the usage
    event, of the key change, or of the scan that noticed it.
    """

    kind: AlertKind
    key_id: str
    owner: str | None
    at: float
    details: Mapping[str, JSON] = field(default_factory=dict)
    id: str = field(default_factory=_new_id)

    def to_dict(self) -> dict[str, JSON]:
        """The webhook body as a dict (and what callbacks may log)."""
        return {
            "id": self.id,
            "kind": self.kind.value,
            "key_id": self.key_id,
            "owner": self.owner,
            "at": from_timestamp(self.at).isoformat().replace("+00:00", "Z"),
            "details": dict(self.details),
        }

    def to_json(self) -> bytes:
        """The exact bytes POSTed (and signed): compact, keys sorted, UTF-8."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return text.encode()
