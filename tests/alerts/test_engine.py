"""The Alerts front: per-owner rules and the usage path through observe()."""

from __future__ import annotations

from datetime import timedelta

from keyguard import AsyncKeyManager
from keyguard.alerts import Alert, AlertConfig, AlertKind, AlertRules, Alerts, OwnerAlerts
from keyguard.backends.memory import MemoryKeyStore
from keyguard.testing import FakeClock

from .conftest import event, quota

SILENT = AlertRules(quota_thresholds=(), error_rate=None, new_ip=None, burst=None)


def test_owner_rules_replace_the_global_ones(clock: FakeClock) -> None:
    """An owner's own rules apply to their keys; others keep the global rules; events
    without limit states skip the quota rule."""
    seen: list[Alert] = []
    alerts = Alerts(AlertConfig(), clock=clock, callbacks=[seen.append])
    alerts.owners.set("bob", OwnerAlerts(rules=SILENT))
    at = clock.now()
    alerts.observe(
        [
            event(at, owner="bob", key_id="bob_1", limits=(quota(at, 10, 10),)),
            event(at, owner="alice", key_id="alice_1", limits=(quota(at, 10, 10),)),
            event(at, owner=None, key_id="ops_1"),
        ]
    )
    assert alerts.flush(timeout=3.0)
    assert [(a.kind, a.key_id) for a in seen] == [(AlertKind.QUOTA, "alice_1")]
    alerts.close(timeout=1.0)


async def test_ascan_pages_through_every_key(clock: FakeClock) -> None:
    """The async scan reads every page of the store."""
    alerts = Alerts(clock=clock)
    manager = AsyncKeyManager(MemoryKeyStore(), clock=clock)
    for i in range(1001):
        await manager.create(f"k{i}", expires=timedelta(hours=1))
    assert await alerts.ascan(manager) == 1001
    alerts.close(timeout=1.0)
