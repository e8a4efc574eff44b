"""Alerts: quota thresholds, expiring keys, error spikes, unusual activity and key
lifecycle changes, delivered to Python callbacks and signed webhooks.

Typical wiring::

    alerts = Alerts(AlertConfig(webhooks=(Webhook(url, secret),)))
    alerts.attach(recorder)                        # usage rules
    manager = KeyManager(store, on_event=alerts.key_changed)  # lifecycle
    alerts.scan(manager)                           # now and then: expiry
    alerts.close()                                 # at shutdown

See ``docs/alerts.md`` for the webhook format and how receivers verify it.

.. versionadded:: 0.2
"""

from __future__ import annotations

from .config import (
    AlertConfig,
    AlertRules,
    BurstRule,
    ErrorRateRule,
    NewIPRule,
    OwnerAlerts,
    RetryPolicy,
    Webhook,
)
from .delivery import AlertCallback, DeliveryRecord, DeliveryStatus
from .engine import Alerts
from .model import Alert, AlertKind
from .registry import AlertRegistry
from .signing import (
    EVENT_ID_HEADER,
    EVENT_KIND_HEADER,
    SIGNATURE_HEADER,
    signature_header,
    verify_signature,
)
from .transport import Response, Transport, http_post

__all__ = [
    "EVENT_ID_HEADER",
    "EVENT_KIND_HEADER",
    "SIGNATURE_HEADER",
    "Alert",
    "AlertCallback",
    "AlertConfig",
    "AlertKind",
    "AlertRegistry",
    "AlertRules",
    "Alerts",
    "BurstRule",
    "DeliveryRecord",
    "DeliveryStatus",
    "ErrorRateRule",
    "NewIPRule",
    "OwnerAlerts",
    "Response",
    "RetryPolicy",
    "Transport",
    "Webhook",
    "http_post",
    "signature_header",
    "verify_signature",
]
