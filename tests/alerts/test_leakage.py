"""SECURITY.md C7 for alerts: a canary credential placed everywhere around keys and
usage events never reaches a webhook (body or headers), a callback or a log line."""

from __future__ import annotations

import json
import logging
from datetime import timedelta

import pytest

from keyguard import KeyManager
from keyguard.alerts import (
    Alert,
    AlertConfig,
    AlertKind,
    AlertRules,
    Alerts,
    BurstRule,
    ErrorRateRule,
    NewIPRule,
    RetryPolicy,
    Webhook,
)
from keyguard.backends.memory import MemoryKeyStore
from keyguard.testing import FakeClock

from .conftest import SECRET, ReceiverFactory, event, quota

CANARY = "kg_live_CANARYc4n4ryC4N4RYcanary0123456789"
RULES = AlertRules(
    quota_thresholds=(0.5,),
    expiry_days=(7,),
    error_rate=ErrorRateRule(share=0.1, window=60, min_requests=1, cooldown=0),
    new_ip=NewIPRule(cooldown=0),
    burst=BurstRule(factor=1.5, floor=5, average=60, warmup=0, cooldown=0),
)


def test_canary_never_leaves_in_alerts(
    receiver: ReceiverFactory, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Every alert kind fires; no secret, digest, hint, metadata, route, query string
    or request id is in any of them, and the client IP only in the new-IP alert."""
    target = receiver()
    hook = Webhook(target.url, SECRET, allow_private=True)
    retry = RetryPolicy(attempts=2, base=0.01, cap=0.02, timeout=1.0)
    seen: list[Alert] = []
    alerts = Alerts(
        AlertConfig(rules=RULES, webhooks=(hook,), retry=retry),
        clock=clock,
        callbacks=[seen.append],
    )
    manager = KeyManager(MemoryKeyStore(), clock=clock, on_event=alerts.key_changed)
    meta = {"note": CANARY}
    kept = manager.create("kept", owner="alice", expires=timedelta(days=2), metadata=meta)
    gone = manager.create("gone", owner="alice", metadata=meta)
    rotated = manager.rotate(kept.record.id)
    manager.revoke(gone.record.id, reason="offboarding")
    key_id = kept.record.id
    secrets = {CANARY, kept.key.reveal(), gone.key.reveal(), rotated.key.reveal()}
    secrets |= {d.digest for d in rotated.record.digests} | {rotated.record.hint}

    at = clock.now()
    for n, ip in enumerate(["198.51.100.1", "198.51.100.2"] * 5):
        usage = event(
            at + n,
            key_id=key_id,
            status=500,
            client_ip=ip,
            route=f"/v1/files/{CANARY}?api_key={CANARY}",
            request_id=CANARY,
            limits=(quota(at + n, 10, 6 + n // 3),),
        )
        alerts.observe([usage])
    clock.advance(timedelta(days=3))
    with caplog.at_level(logging.DEBUG, logger="keyguard"):
        alerts.scan(manager)
        assert alerts.flush(timeout=5.0)
    alerts.close(timeout=1.0)

    assert {a.kind for a in seen} == set(AlertKind)
    assert len(target.handled) == len(seen)
    payloads = [repr(a) + a.to_json().decode() for a in seen]
    payloads += [repr(hit.headers) + hit.body.decode() for hit in target.hits]
    payloads += [repr(record) for record in alerts.deliveries()]
    payloads.append(caplog.text)
    for text in payloads:
        for secret in secrets:
            assert secret not in text
        assert "api_key" not in text
        assert "/v1/files" not in text
    for alert in seen:
        text = json.dumps(alert.to_dict())
        assert ("198.51.100." in text) == (alert.kind is AlertKind.NEW_IP)
