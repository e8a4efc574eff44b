"""The server scans its keys for the alerts no request triggers: a key made beside the
server (by the CLI, say) that expires soon is announced by the next scan."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

from reference_app.config import ServerSettings

from keyguard import KeyGuardSettings, KeyManager
from keyguard.alerts import Alert, AlertKind

from .conftest import MakeServer


def test_a_key_expiring_soon_is_announced_by_the_scan(
    make_server: MakeServer, tmp_path: Path
) -> None:
    settings = KeyGuardSettings(storage_url=f"sqlite:///{tmp_path / 'keyguard.db'}")
    server = make_server(settings, ServerSettings(alert_scan_interval=1))
    seen: list[Alert] = []
    server.client.app.state.alerts.add_callback(seen.append)  # type: ignore[attr-defined]
    store = settings.open_store()  # the CLI's view: the server's hooks never see this
    made = KeyManager(store).create("soon", owner="acme", expires=timedelta(days=2))
    store.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not any(a.kind is AlertKind.EXPIRING for a in seen):
        time.sleep(0.05)
    assert [a.key_id for a in seen if a.kind is AlertKind.EXPIRING] == [made.record.id]
