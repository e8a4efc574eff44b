"""Per-owner alert settings (webhooks and thresholds), as the dashboard edits them.

In memory, per process: a deployment with several workers sets each owner's settings
in every worker (or loads them from its own database at start-up). Reads take no lock
(one dict lookup); writes are validated and replace a whole frozen value.
"""

from __future__ import annotations

import threading

from ..errors import ConfigurationError
from .config import AlertRules, OwnerAlerts, Webhook

__all__ = ["AlertRegistry"]

_NOTHING = OwnerAlerts()
_MAX_OWNER = 200


class AlertRegistry:
    """Owner name -> :class:`OwnerAlerts`.

    :param allow_private: accept owner webhooks on private addresses. Off by default:
        an owner's URL is aimed by someone outside the operator's trust (SSRF).
    """

    def __init__(self, *, allow_private: bool = False) -> None:
        self.allow_private = allow_private
        self._owners: dict[str, OwnerAlerts] = {}
        self._lock = threading.Lock()

    def get(self, owner: str) -> OwnerAlerts:
        """The owner's settings; empty ones when never set."""
        return self._owners.get(owner, _NOTHING)

    def set(self, owner: str, settings: OwnerAlerts) -> None:
        """Replace the owner's settings; raises :class:`ConfigurationError` if refused."""
        if not isinstance(owner, str) or not 0 < len(owner) <= _MAX_OWNER:
            raise ConfigurationError(f"alerts: an owner is a string of 1-{_MAX_OWNER} chars")
        if not isinstance(settings, OwnerAlerts):
            raise ConfigurationError("alerts: owner settings must be an OwnerAlerts")
        if not self.allow_private and any(hook.allow_private for hook in settings.webhooks):
            raise ConfigurationError("alerts: owner webhooks may not target private addresses")
        with self._lock:
            self._owners[owner] = settings

    def delete(self, owner: str) -> None:
        with self._lock:
            self._owners.pop(owner, None)

    def rules_for(self, owner: str | None, default: AlertRules) -> AlertRules:
        if owner is None:
            return default
        rules = self._owners.get(owner, _NOTHING).rules
        return default if rules is None else rules

    def webhooks_for(self, owner: str | None) -> tuple[Webhook, ...]:
        if owner is None:
            return ()
        return self._owners.get(owner, _NOTHING).webhooks
