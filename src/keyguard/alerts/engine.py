"""The alerts front: rules in, alerts out to callbacks and webhooks.

:meth:`Alerts.observe` runs on the usage recorder's flusher thread (about once a
second) and :meth:`Alerts.key_changed` on whichever thread changed a key; both only
evaluate rules in memory and queue the alerts, so neither ever waits on a receiver.

Rule state (what has fired, addresses seen, moving averages) is per process. With
several workers each keeps its own, so a threshold may fire once *per worker* and a
burst spread over workers may go unseen; a restart forgets what fired. Receivers
should treat alerts as at-least-once and drop duplicates by kind, key and details.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from ..clock import Clock, SystemClock
from ..records import AuditEvent, KeyRecord
from ..usage.records import UsageEvent
from .config import AlertConfig, Webhook
from .delivery import AlertCallback, DeliveryRecord, Dispatcher
from .keyrules import ExpiryWatch, lifecycle_alert
from .model import Alert
from .registry import AlertRegistry
from .rules import BurstWatch, ErrorRateWatch, NewIPWatch, QuotaWatch
from .transport import Transport, http_post

if TYPE_CHECKING:
    from ..manager import AsyncKeyManager, KeyManager
    from ..usage.recorder import UsageRecorder

__all__ = ["Alerts"]

_PAGE = 1000


class Alerts:
    """Watches usage and key changes and tells callbacks and webhooks.

    :param config: rules, operator webhooks and delivery policy.
    :param clock: the time of scans and key checks (usage rules use event times).
    :param callbacks: called with each :class:`Alert` on the delivery thread.
    :param transport: how a webhook is POSTed (default: ``http.client``).
    :param jitter: random numbers in [0, 1) for backoff jitter (tests pin it).

    Wire it up with ``alerts.attach(recorder)`` and
    ``KeyManager(store, on_event=alerts.key_changed)``; call :meth:`scan` now and
    then (e.g. hourly) to find keys that expire soon or have expired; call
    :meth:`close` at shutdown.
    """

    def __init__(
        self,
        config: AlertConfig | None = None,
        *,
        clock: Clock | None = None,
        callbacks: Sequence[AlertCallback] = (),
        transport: Transport | None = None,
        jitter: Callable[[], float] | None = None,
    ) -> None:
        self.config = config = config or AlertConfig()
        self.clock = clock or SystemClock()
        self.owners = AlertRegistry(allow_private=config.allow_private_owner_webhooks)
        self._dispatcher = Dispatcher(
            retry=config.retry,
            queue_size=config.queue_size,
            history_size=config.history_size,
            transport=transport or http_post,
            jitter=jitter or random.random,  # backoff jitter, not a secret
            callbacks=callbacks,
        )
        self._lock = threading.Lock()
        self._quota = QuotaWatch(config.max_keys)
        self._errors = ErrorRateWatch(config.max_keys)
        self._addresses = NewIPWatch(config.max_keys, config.ips_per_key, config.ipv6_prefix)
        self._bursts = BurstWatch(config.max_keys)
        self._expiry = ExpiryWatch(config.max_keys, config.expired_lookback)

    def __repr__(self) -> str:
        return f"Alerts(webhooks={len(self.config.webhooks)})"

    def add_callback(self, callback: AlertCallback) -> None:
        """Also call ``callback`` with every alert (on the delivery thread)."""
        self._dispatcher.callbacks.append(callback)

    def attach(self, recorder: UsageRecorder) -> None:
        """Watch every batch of usage events ``recorder`` drains."""
        recorder.subscribe(self.observe)

    def observe(self, events: Sequence[UsageEvent]) -> None:
        """Run the usage rules over ``events`` and queue what fires."""
        fired: list[Alert] = []
        default = self.config.rules
        with self._lock:
            for event in events:
                rules = self.owners.rules_for(event.owner, default)
                if rules.quota_thresholds and event.limits:
                    fired += self._quota.observe(event, rules.quota_thresholds)
                if rules.error_rate is not None:
                    fired += self._errors.observe(event, rules.error_rate)
                if rules.new_ip is not None:
                    fired += self._addresses.observe(event, rules.new_ip)
                if rules.burst is not None:
                    fired += self._bursts.observe(event, rules.burst)
        for alert in fired:
            self.emit(alert)

    def key_changed(self, event: AuditEvent, record: KeyRecord) -> None:
        """The key manager's ``on_event`` hook: lifecycle alerts and expiry checks."""
        rules = self.owners.rules_for(record.owner, self.config.rules)
        fired: list[Alert] = []
        if rules.lifecycle:
            alert = lifecycle_alert(event, record)
            if alert is not None:
                fired.append(alert)
        with self._lock:
            if event.action == "delete":
                for watch in (self._quota, self._errors, self._addresses, self._bursts):
                    watch.forget(record.id)
                self._expiry.forget(record.id)
            else:
                fired += self._check(record, self.clock.now())
        for alert in fired:
            self.emit(alert)

    def check_keys(self, records: Iterable[KeyRecord]) -> int:
        """Run the expiry rules over ``records`` now; the number of alerts queued."""
        now = self.clock.now()
        fired: list[Alert] = []
        for record in records:
            with self._lock:
                fired += self._check(record, now)
        for alert in fired:
            self.emit(alert)
        return len(fired)

    def scan(self, manager: KeyManager) -> int:
        """Check every key in ``manager``'s store (page by page); alerts queued."""
        count, cursor = 0, None
        while True:
            page = manager.list(after=cursor, limit=_PAGE)
            count += self.check_keys(page.items)
            cursor = page.next_cursor
            if cursor is None:
                return count

    async def ascan(self, manager: AsyncKeyManager) -> int:
        """:meth:`scan` for an :class:`~keyguard.AsyncKeyManager`."""
        count, cursor = 0, None
        while True:
            page = await manager.list(after=cursor, limit=_PAGE)
            count += self.check_keys(page.items)
            cursor = page.next_cursor
            if cursor is None:
                return count

    def emit(self, alert: Alert) -> bool:
        """Queue ``alert`` for the callbacks, the operator's webhooks and its owner's.

        ``False`` if it was dropped because the queue is full or closed.
        """
        hooks: list[tuple[str | None, Webhook]] = [
            (None, hook) for hook in self.config.webhooks if hook.wants(alert.kind)
        ]
        if alert.owner is not None:
            hooks += [
                (alert.owner, hook)
                for hook in self.owners.webhooks_for(alert.owner)
                if hook.wants(alert.kind)
            ]
        return self._dispatcher.submit(alert, hooks)

    def deliveries(self, owner: str | None = None) -> list[DeliveryRecord]:
        """Recent deliveries to ``owner``'s webhooks (``None``: the operator's), newest
        first, at most ``history_size``."""
        return self._dispatcher.history(owner)

    @property
    def dropped(self) -> int:
        """Alerts or deliveries dropped because the queue was full or closing."""
        return self._dispatcher.dropped

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every queued alert is delivered, failed or dropped."""
        return self._dispatcher.wait_idle(timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the worker: pending retries get their remaining attempts at once until
        ``timeout``, then are dropped. New alerts after this are dropped."""
        self._dispatcher.close(timeout)

    def _check(self, record: KeyRecord, now: float) -> list[Alert]:
        rules = self.owners.rules_for(record.owner, self.config.rules)
        return self._expiry.check(record, now, rules.expiry_days, expired=rules.lifecycle)
