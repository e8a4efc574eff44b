"""Webhooks end to end against a real HTTP receiver on 127.0.0.1 that verifies
signatures and refuses replays: retries, backoff, once-per-period delivery, nothing
lost within the retry budget, and a request path that never waits for a receiver."""

from __future__ import annotations

import http.client
import itertools
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from keyguard.alerts import (
    AlertConfig,
    AlertKind,
    AlertRules,
    Alerts,
    DeliveryStatus,
    RetryPolicy,
    Webhook,
    signature_header,
)
from keyguard.backends.memory_usage import MemoryUsageStore
from keyguard.usage.recorder import UsageRecorder

from .conftest import DAY, SECRET, Receiver, ReceiverFactory, event, quota

QUOTA_ONLY = AlertRules(error_rate=None, new_ip=None, burst=None)
FAST = RetryPolicy(attempts=5, base=0.01, cap=0.05, timeout=1.0)
T = 1_800_000_000.0


@pytest.fixture
def recorder() -> Iterator[UsageRecorder]:
    usage = UsageRecorder(MemoryUsageStore(), flush_interval=60)
    yield usage
    usage.close()


def hub(*urls: str, retry: RetryPolicy = FAST, secret: str = SECRET) -> Alerts:
    hooks = tuple(Webhook(url, secret, allow_private=True) for url in urls)
    config = AlertConfig(rules=QUOTA_ONLY, webhooks=hooks, retry=retry)
    return Alerts(config, jitter=lambda: 1.0)


def use(recorder: UsageRecorder, at: float, used: int, key_id: str = "key_1") -> None:
    recorder.record(event(at, key_id=key_id, limits=(quota(at, 100, used),)))


def post(receiver: Receiver, headers: dict[str, str], body: bytes) -> int:
    host, port = receiver.url.split("/")[2].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=2)
    try:
        connection.request("POST", "/hooks/keyguard", body=body, headers=headers)
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def test_retries_with_backoff_then_delivers_once_per_period(
    receiver: ReceiverFactory, recorder: UsageRecorder
) -> None:
    """500, 500, 500, then 200: four signed attempts with growing waits, one delivery;
    more usage in the period sends nothing new, 100 % and the next day do."""
    target = receiver(script=[500, 500, 500])
    alerts = hub(target.url)
    alerts.attach(recorder)
    for used in (70, 79, 80, 85, 90):
        use(recorder, T + used, used)
    recorder.flush()
    assert alerts.flush(timeout=5.0)
    assert [hit.status for hit in target.hits] == [500, 500, 500, 200]
    assert all(hit.verified for hit in target.hits)
    assert len({hit.headers["X-Keyguard-Event-Id"] for hit in target.hits}) == 1
    gaps = [b.at - a.at for a, b in itertools.pairwise(target.hits)]
    for gap, wanted in zip(gaps, [0.01, 0.02, 0.04], strict=True):
        assert gap >= wanted
    [record] = alerts.deliveries()
    assert (record.status, record.attempts, record.http_status) == (
        DeliveryStatus.DELIVERED,
        4,
        200,
    )
    [body] = target.handled.values()
    assert body["kind"] == "quota.threshold"
    assert body["details"]["threshold"] == 0.8

    for used in (95, 99, 100, 100):
        use(recorder, T + 200 + used, used)
    use(recorder, T + DAY, 80)
    use(recorder, T + DAY + 1, 81)
    recorder.flush()
    assert alerts.flush(timeout=5.0)
    handled = sorted(
        (b["details"]["resets_at"], b["details"]["threshold"]) for b in target.handled.values()
    )
    assert handled == [
        ("2027-01-16T00:00:00Z", 0.8),
        ("2027-01-16T00:00:00Z", 1.0),
        ("2027-01-17T00:00:00Z", 0.8),
    ]
    assert target.duplicates == 0
    alerts.close(timeout=1.0)


def test_receiver_refuses_replays_and_forgeries(receiver: ReceiverFactory) -> None:
    """A captured delivery resent is a duplicate; an old signature, a changed body or
    the wrong secret is refused (and a 400 is not retried)."""
    target = receiver()
    alerts = hub(target.url)
    alerts.emit(alerts_alert())
    assert alerts.flush(timeout=5.0)
    [hit] = target.hits
    assert post(target, hit.headers, hit.body) == 200
    assert target.duplicates == 1
    assert len(target.handled) == 1
    stale = dict(hit.headers)
    stale["X-Keyguard-Signature"] = signature_header(SECRET, hit.body, int(time.time()) - 301)
    assert post(target, stale, hit.body) == 400
    assert post(target, hit.headers, hit.body.replace(b"key_1", b"key_2")) == 400
    alerts.close(timeout=1.0)

    wrong = hub(target.url, secret="not-the-receivers-secret")
    wrong.emit(alerts_alert())
    assert wrong.flush(timeout=5.0)
    [record] = wrong.deliveries()
    assert (record.status, record.attempts, record.http_status) == (
        DeliveryStatus.FAILED,
        1,
        400,
    )
    wrong.close(timeout=1.0)


def alerts_alert() -> Any:
    from keyguard.alerts import Alert

    return Alert(AlertKind.REVOKED, "key_1", "alice", T, {"reason": "rotation"})


def test_nothing_is_lost_within_the_retry_budget(
    receiver: ReceiverFactory, recorder: UsageRecorder
) -> None:
    """Thirty failures spread over twenty alerts: every alert is delivered exactly once."""
    target = receiver(script=[500, 503, 502] * 10)
    alerts = hub(target.url)
    alerts.attach(recorder)
    for n in range(20):
        use(recorder, T, 90, key_id=f"key_{n}")
    recorder.flush()
    assert alerts.flush(timeout=10.0)
    assert len(target.handled) == 20
    assert {b["key_id"] for b in target.handled.values()} == {f"key_{n}" for n in range(20)}
    assert all(r.status is DeliveryStatus.DELIVERED for r in alerts.deliveries())
    assert target.duplicates == 0
    alerts.close(timeout=1.0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_slow_or_down_receivers_delay_nothing(
    receiver: ReceiverFactory, recorder: UsageRecorder
) -> None:
    """With one receiver hanging and another refusing connections, recording usage
    (the request path) and the recorder's flush stay fast — far below one attempt's
    timeout — and close() is bounded."""
    slow = receiver(delay=1.5)
    down = f"http://127.0.0.1:{free_port()}/hook"
    retry = RetryPolicy(attempts=3, base=0.05, cap=0.1, timeout=1.0)
    alerts = hub(slow.url, down, retry=retry)
    alerts.attach(recorder)
    started = time.perf_counter()
    for n in range(2000):
        use(recorder, T + n / 100, 90, key_id=f"key_{n % 50}")
    recording = time.perf_counter() - started
    started = time.perf_counter()
    recorder.flush()
    flushing = time.perf_counter() - started
    assert recording < 0.5  # ~2000 deque appends (bounds are loose for loaded CI hosts)
    assert flushing < 0.5  # rules ran and 50 alerts were queued; nobody waited on HTTP
    started = time.perf_counter()
    alerts.close(timeout=0.2)
    assert time.perf_counter() - started < 2.5  # the bound, plus one attempt's timeout
    statuses = {r.status for r in alerts.deliveries()}
    assert statuses <= {DeliveryStatus.DROPPED, DeliveryStatus.FAILED, DeliveryStatus.DELIVERED}
    assert alerts.dropped > 0


def test_transport_pins_the_checked_address(
    receiver: ReceiverFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host name is resolved once, checked, and connected to by address with the
    name in the Host header; a name resolving to a private address is blocked and not
    retried."""
    target = receiver()
    port = int(target.url.rsplit(":", 1)[1].split("/")[0])
    real = socket.getaddrinfo

    def fake(host: str, *args: Any, **kwargs: Any) -> Any:
        if host == "hooks.example.test":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    url = f"http://hooks.example.test:{port}/hooks/keyguard"
    allowed = hub(url)
    allowed.emit(alerts_alert())
    assert allowed.flush(timeout=5.0)
    [hit] = target.hits
    assert hit.headers["Host"] == f"hooks.example.test:{port}"
    allowed.close(timeout=1.0)

    config = AlertConfig(webhooks=(Webhook(url, SECRET),), retry=FAST)
    blocked = Alerts(config)
    blocked.emit(alerts_alert())
    assert blocked.flush(timeout=5.0)
    [record] = blocked.deliveries()
    assert (record.status, record.attempts, record.error) == (
        DeliveryStatus.FAILED,
        1,
        "BlockedAddress",
    )
    assert len(target.hits) == 1
    blocked.close(timeout=1.0)
