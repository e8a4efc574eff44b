"""Key rules: lifecycle alerts through the manager hook, expiry by scan."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest

from keyguard import AsyncKeyManager, KeyChanges, KeyManager
from keyguard.alerts import Alert, AlertConfig, AlertKind, AlertRules, Alerts, OwnerAlerts
from keyguard.backends.memory import MemoryKeyStore
from keyguard.testing import FakeClock


@pytest.fixture
def received() -> list[Alert]:
    return []


@pytest.fixture
def alerts(clock: FakeClock, received: list[Alert]) -> Iterator[Alerts]:
    hub = Alerts(AlertConfig(rules=AlertRules(expiry_days=(7, 1))), clock=clock)
    hub.add_callback(received.append)
    yield hub
    hub.close(timeout=1.0)


@pytest.fixture
def manager(alerts: Alerts, clock: FakeClock) -> KeyManager:
    return KeyManager(MemoryKeyStore(), clock=clock, on_event=alerts.key_changed)


def kinds(alerts: Alerts, received: list[Alert]) -> list[AlertKind]:
    assert alerts.flush(timeout=2.0)
    return [alert.kind for alert in received]


def test_lifecycle_alerts(alerts: Alerts, manager: KeyManager, received: list[Alert]) -> None:
    """Create, rotate and revoke each send one alert with safe details; updates and
    deletes send none."""
    issued = manager.create("ci", owner="alice", scopes=["chat:completions"])
    manager.update(issued.record.id, KeyChanges(name="ci-2"))
    manager.rotate(issued.record.id, grace=timedelta(hours=1))
    manager.revoke(issued.record.id, reason="leaked")
    manager.revoke(issued.record.id, reason="again")  # no change, no alert
    manager.delete(issued.record.id)
    assert kinds(alerts, received) == [AlertKind.CREATED, AlertKind.ROTATED, AlertKind.REVOKED]
    created, rotated, revoked = received
    assert created.owner == "alice"
    assert created.details == {
        "name": "ci",
        "plan": "free",
        "scopes": ["chat:completions"],
        "expires_at": None,
        "actor": "system",
    }
    assert rotated.details["previous_valid_until"] == "2027-01-15T09:00:00Z"
    assert revoked.details["reason"] == "leaked"


def test_lifecycle_can_be_turned_off_per_owner(
    alerts: Alerts, manager: KeyManager, received: list[Alert]
) -> None:
    """An owner whose rules say lifecycle=False gets no lifecycle alerts."""
    alerts.owners.set("bob", OwnerAlerts(rules=AlertRules(lifecycle=False)))
    manager.create("quiet", owner="bob")
    manager.create("loud", owner="alice")
    assert kinds(alerts, received) == [AlertKind.CREATED]


def test_expiry_warns_once_per_threshold_and_reports_expiry(
    alerts: Alerts, manager: KeyManager, clock: FakeClock, received: list[Alert]
) -> None:
    """A scan warns at 7 days, then 1 day, each once; expiry is reported once; a new
    expiry date starts afresh."""
    issued = manager.create("temp", owner="alice", expires=timedelta(days=10))
    key_id = issued.record.id
    manager.create("forever", owner="alice")
    assert alerts.scan(manager) == 0
    clock.advance(timedelta(days=4))
    assert alerts.scan(manager) == 1
    assert alerts.scan(manager) == 0
    clock.advance(timedelta(days=5, hours=12))
    assert alerts.scan(manager) == 1
    clock.advance(timedelta(days=1))
    assert alerts.scan(manager) == 1
    assert alerts.scan(manager) == 0
    assert kinds(alerts, received)[2:] == [
        AlertKind.EXPIRING,
        AlertKind.EXPIRING,
        AlertKind.EXPIRED,
    ]
    warn7, warn1, expired = received[2:]
    assert warn7.details["threshold_days"] == 7
    assert warn7.details["days_left"] == 6.0
    assert warn1.details["threshold_days"] == 1
    assert expired.key_id == key_id
    manager.update(key_id, KeyChanges(), expires=timedelta(hours=12))  # extended
    assert alerts.scan(manager) == 0  # the update's own check already warned
    assert kinds(alerts, received)[-1] is AlertKind.EXPIRING


def test_long_expired_and_revoked_keys_are_not_announced(
    alerts: Alerts, clock: FakeClock, received: list[Alert]
) -> None:
    """A fresh process (nothing remembered) stays silent about keys that expired
    beyond the lookback and about revoked keys; a recent expiry is reported."""
    manager = KeyManager(MemoryKeyStore(), clock=clock)  # no hook: "before the restart"
    manager.create("old", owner="alice", expires=timedelta(days=1))
    manager.create("recent", owner="alice", expires=timedelta(days=4, hours=12))
    revoked = manager.create("gone", owner="alice", expires=timedelta(days=3))
    manager.revoke(revoked.record.id)
    clock.advance(timedelta(days=5))
    assert alerts.scan(manager) == 1
    assert kinds(alerts, received) == [AlertKind.EXPIRED]


def test_scan_pages_through_every_key(alerts: Alerts, clock: FakeClock) -> None:
    """A scan reads every page of the store."""
    manager = KeyManager(MemoryKeyStore(), clock=clock)
    for i in range(1005):
        manager.create(f"k{i}", expires=timedelta(days=2))
    assert alerts.scan(manager) == 1005


async def test_async_scan_and_hook(clock: FakeClock, received: list[Alert]) -> None:
    """The async manager takes the same hook, and ascan finds expiring keys."""
    hub = Alerts(clock=clock, callbacks=[received.append])
    manager = AsyncKeyManager(MemoryKeyStore(), clock=clock, on_event=hub.key_changed)
    await manager.create("a", owner="alice", expires=timedelta(days=3))
    assert await hub.ascan(manager) == 0  # warned already when it was created
    clock.advance(timedelta(days=2, hours=12))
    assert await hub.ascan(manager) == 1
    assert kinds(hub, received) == [AlertKind.CREATED, AlertKind.EXPIRING, AlertKind.EXPIRING]
    hub.close(timeout=1.0)
