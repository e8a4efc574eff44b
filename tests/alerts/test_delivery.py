"""Delivery: retry classification, backoff, bounds, history and shutdown, with a
scripted in-process transport (the real HTTP path is in test_webhooks.py)."""

from __future__ import annotations

import http.client
import itertools
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import pytest

from keyguard.alerts import (
    Alert,
    AlertConfig,
    AlertKind,
    Alerts,
    DeliveryStatus,
    OwnerAlerts,
    Response,
    RetryPolicy,
    Webhook,
    verify_signature,
)
from keyguard.alerts.urls import BlockedAddress

from .conftest import SECRET

FAST = RetryPolicy(attempts=5, base=0.01, cap=0.04, timeout=1.0)
OPS = Webhook("https://ops.example.com/hooks/T0123/secret-path-token", SECRET)


@dataclass
class Scripted:
    """A transport answering from a script (then 200), remembering every call."""

    script: list[Response | Exception] = field(default_factory=list)
    calls: list[tuple[float, str, Mapping[str, str], bytes]] = field(default_factory=list)
    gate: threading.Event | None = None

    def __call__(
        self, hook: Webhook, body: bytes, headers: Mapping[str, str], timeout: float
    ) -> Response:
        if self.gate is not None:
            self.gate.wait(5.0)
        self.calls.append((time.monotonic(), hook.url, dict(headers), body))
        step = self.script.pop(0) if self.script else Response(200)
        if isinstance(step, Exception):
            raise step
        return step


def hub(
    transport: Scripted,
    *,
    retry: RetryPolicy = FAST,
    jitter: Callable[[], float] = lambda: 1.0,
    **options: object,
) -> Alerts:
    config = AlertConfig(webhooks=(OPS,), retry=retry, **options)  # type: ignore[arg-type]
    return Alerts(config, transport=transport, jitter=jitter)


def alert(kind: AlertKind = AlertKind.REVOKED, owner: str | None = "alice") -> Alert:
    return Alert(kind, "key_1", owner, 1_800_000_000.0, {"reason": "test"})


@pytest.mark.parametrize(
    ("script", "status", "attempts", "http_status", "error"),
    [
        ([Response(204)], DeliveryStatus.DELIVERED, 1, 204, None),
        ([Response(400)], DeliveryStatus.FAILED, 1, 400, None),
        ([Response(410)], DeliveryStatus.FAILED, 1, 410, None),
        ([Response(301)], DeliveryStatus.FAILED, 1, 301, None),
        ([BlockedAddress("no")], DeliveryStatus.FAILED, 1, None, "BlockedAddress"),
        ([Response(408), Response(200)], DeliveryStatus.DELIVERED, 2, 200, None),
        ([Response(429), Response(200)], DeliveryStatus.DELIVERED, 2, 200, None),
        ([Response(503), TimeoutError(), Response(200)], DeliveryStatus.DELIVERED, 3, 200, None),
        ([ConnectionRefusedError(), Response(200)], DeliveryStatus.DELIVERED, 2, 200, None),
        (
            [http.client.RemoteDisconnected("closed"), Response(200)],
            DeliveryStatus.DELIVERED,
            2,
            200,
            None,
        ),
        ([Response(500)] * 5, DeliveryStatus.FAILED, 5, 500, None),
        ([Response(500)] * 4 + [TimeoutError()], DeliveryStatus.FAILED, 5, None, "TimeoutError"),
        ([ValueError("bug")], DeliveryStatus.FAILED, 1, None, "ValueError"),
    ],
)
def test_outcomes(
    script: list[Response | Exception],
    status: DeliveryStatus,
    attempts: int,
    http_status: int | None,
    error: str | None,
) -> None:
    """2xx delivers; 4xx (but 408/429), 3xx and blocked addresses give up; 5xx,
    timeouts and connection errors retry within the budget; a transport bug gives up
    and never kills the worker."""
    transport = Scripted(list(script))
    alerts = hub(transport)
    alerts.emit(alert())
    assert alerts.flush(timeout=3.0)
    [record] = alerts.deliveries(None)
    assert (record.status, record.attempts, record.http_status, record.error) == (
        status,
        attempts,
        http_status,
        error,
    )
    assert record.target == "https://ops.example.com"  # never the path (a token)
    alerts.emit(alert())  # the worker is still alive
    assert alerts.flush(timeout=3.0)
    assert alerts.deliveries(None)[0].status is DeliveryStatus.DELIVERED
    alerts.close(timeout=1.0)


def test_backoff_doubles_up_to_the_cap() -> None:
    """Waits between attempts follow base*2**n (jitter pinned at its top) to the cap."""
    transport = Scripted([Response(500)] * 4)
    retry = RetryPolicy(attempts=5, base=0.02, cap=0.08, timeout=1.0)
    alerts = hub(transport, retry=retry)
    alerts.emit(alert())
    assert alerts.flush(timeout=3.0)
    times = [call[0] for call in transport.calls]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(gaps) == 4
    for gap, wanted in zip(gaps, [0.02, 0.04, 0.08, 0.08], strict=True):
        assert wanted <= gap < wanted + 0.1
    alerts.close(timeout=1.0)


def test_retry_after_is_honoured_within_the_cap() -> None:
    """A 429's Retry-After lengthens the wait, but never past the cap."""
    transport = Scripted([Response(429, retry_after=100.0)])
    alerts = hub(transport, retry=RetryPolicy(attempts=2, base=0.01, cap=0.15, timeout=1.0))
    alerts.emit(alert())
    assert alerts.flush(timeout=3.0)
    first, second = transport.calls
    assert 0.15 <= second[0] - first[0] < 0.5
    alerts.close(timeout=1.0)


def test_each_attempt_is_signed_afresh_with_a_stable_event_id() -> None:
    """Retries carry the same event id and body, each with a valid signature."""
    transport = Scripted([Response(500), Response(500)])
    alerts = hub(transport)
    sent = alert()
    alerts.emit(sent)
    assert alerts.flush(timeout=3.0)
    assert len(transport.calls) == 3
    for _, _, headers, body in transport.calls:
        assert headers["X-Keyguard-Event-Id"] == sent.id
        assert headers["X-Keyguard-Event"] == "key.revoked"
        assert headers["Content-Type"] == "application/json"
        assert body == sent.to_json()
        assert verify_signature(SECRET, headers["X-Keyguard-Signature"], body)
    alerts.close(timeout=1.0)


def test_routing_to_operator_and_owner_webhooks() -> None:
    """The operator gets everything; an owner only their keys' alerts, of the kinds
    they asked for; each owner sees only their own delivery history."""
    transport = Scripted()
    alerts = hub(transport)
    mine = Webhook("https://alice.example.com/hook", SECRET, kinds=frozenset({AlertKind.QUOTA}))
    alerts.owners.set("alice", OwnerAlerts(webhooks=(mine,)))
    alerts.emit(alert(AlertKind.QUOTA, owner="alice"))
    alerts.emit(alert(AlertKind.REVOKED, owner="alice"))
    alerts.emit(alert(AlertKind.QUOTA, owner="bob"))
    alerts.emit(alert(AlertKind.QUOTA, owner=None))
    assert alerts.flush(timeout=3.0)
    urls = [call[1] for call in transport.calls]
    assert urls.count(OPS.url) == 4
    assert urls.count(mine.url) == 1
    assert [r.kind for r in alerts.deliveries("alice")] == [AlertKind.QUOTA]
    assert alerts.deliveries("bob") == []
    assert len(alerts.deliveries()) == 4
    alerts.close(timeout=1.0)


def test_callbacks_run_off_the_caller_thread_and_survive_errors(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Callbacks run on the delivery thread; one that raises is logged by type only."""
    threads: list[str] = []

    def broken(_: Alert) -> None:
        raise RuntimeError("secret-ish detail")

    alerts = Alerts(callbacks=[broken, lambda a: threads.append(threading.current_thread().name)])
    with caplog.at_level(logging.ERROR, logger="keyguard"):
        alerts.emit(alert())
        assert alerts.flush(timeout=3.0)
    assert threads == ["keyguard-alerts"]
    assert "RuntimeError" in caplog.text
    assert "secret-ish" not in caplog.text
    alerts.close(timeout=1.0)


def test_queue_is_bounded_and_drops_are_counted() -> None:
    """With the worker stuck, alerts beyond queue_size are dropped and recorded."""
    gate = threading.Event()
    transport = Scripted(gate=gate)
    alerts = hub(transport, queue_size=3, history_size=50)
    results = [alerts.emit(alert()) for _ in range(10)]
    # at most one attempt in flight, queue_size waiting deliveries and queue_size
    # queued alerts: seven
    assert alerts.dropped >= 3
    assert results.count(False) <= alerts.dropped
    gate.set()
    assert alerts.flush(timeout=3.0)
    statuses = [r.status for r in alerts.deliveries()]
    assert statuses.count(DeliveryStatus.DROPPED) == alerts.dropped
    assert statuses.count(DeliveryStatus.DELIVERED) == 10 - alerts.dropped
    alerts.close(timeout=1.0)


def test_history_is_bounded_and_newest_first() -> None:
    """Each owner keeps at most history_size records, newest first."""
    alerts = hub(Scripted(), history_size=3)
    sent = [alert() for _ in range(5)]
    for item in sent:
        alerts.emit(item)
    assert alerts.flush(timeout=3.0)
    assert [r.event_id for r in alerts.deliveries()] == [a.id for a in sent[:1:-1]]
    alerts.close(timeout=1.0)


def test_close_retries_pending_at_once_then_drops() -> None:
    """On close, waiting retries get their remaining attempts without backoff; after
    close, new alerts are dropped."""
    transport = Scripted([Response(500)] * 20)
    alerts = hub(transport, retry=RetryPolicy(attempts=3, base=30, cap=60, timeout=1.0))
    alerts.emit(alert())
    deadline = time.monotonic() + 2
    while not transport.calls and time.monotonic() < deadline:
        time.sleep(0.005)
    started = time.monotonic()
    alerts.close(timeout=2.0)
    assert time.monotonic() - started < 1.5
    [record] = alerts.deliveries()
    assert (record.status, record.attempts) == (DeliveryStatus.FAILED, 3)
    assert not alerts.emit(alert())
    assert alerts.deliveries()[0].status is DeliveryStatus.DROPPED
    alerts.close(timeout=1.0)  # twice is harmless


def test_close_is_bounded_when_the_receiver_hangs() -> None:
    """A receiver that never answers cannot hold close() past its bound; what is left
    is dropped."""
    gate = threading.Event()
    transport = Scripted(gate=gate)
    alerts = hub(transport)
    alerts.emit(alert())
    alerts.emit(alert())
    time.sleep(0.05)
    started = time.monotonic()
    closer = threading.Thread(target=alerts.close, kwargs={"timeout": 0.1})
    closer.start()
    time.sleep(0.2)
    gate.set()  # the stuck attempt ends (as a socket timeout would)
    closer.join(3.0)
    assert time.monotonic() - started < 2.0
    statuses = sorted(r.status for r in alerts.deliveries())
    assert statuses == [DeliveryStatus.DELIVERED, DeliveryStatus.DROPPED]


def test_no_thread_until_the_first_alert() -> None:
    """Building Alerts starts no thread; closing an unused one is immediate."""
    before = threading.active_count()
    alerts = Alerts()
    assert threading.active_count() == before
    assert alerts.flush(timeout=0.1)
    alerts.close(timeout=0.1)
    assert "webhooks=0" in repr(alerts)


def test_flush_times_out_while_a_receiver_hangs() -> None:
    """flush() gives up after its timeout instead of waiting for a stuck receiver."""
    gate = threading.Event()
    alerts = hub(Scripted(gate=gate))
    alerts.emit(alert())
    assert not alerts.flush(timeout=0.05)
    gate.set()
    assert alerts.flush(timeout=3.0)
    alerts.close(timeout=1.0)


def test_full_retry_heap_drops_extra_deliveries() -> None:
    """With room for one waiting delivery, an alert for two webhooks drops the second."""
    second = Webhook("https://second.example.com/hook", SECRET)
    transport = Scripted()
    config = AlertConfig(webhooks=(OPS, second), retry=FAST, queue_size=1)
    alerts = Alerts(config, transport=transport)
    alerts.emit(alert())
    assert alerts.flush(timeout=3.0)
    statuses = sorted(r.status for r in alerts.deliveries())
    assert statuses == [DeliveryStatus.DELIVERED, DeliveryStatus.DROPPED]
    assert alerts.dropped == 1
    alerts.close(timeout=1.0)


def test_a_broken_alert_is_logged_and_the_worker_survives(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An alert whose details cannot be JSON-encoded is logged by error type; the
    next alert still goes out."""
    transport = Scripted()
    alerts = hub(transport)
    broken = Alert(AlertKind.QUOTA, "key_1", None, 0.0, {"bad": object()})  # type: ignore[dict-item]
    with caplog.at_level(logging.ERROR, logger="keyguard"):
        alerts.emit(broken)
        alerts.emit(alert())
        assert alerts.flush(timeout=3.0)
    assert "TypeError" in caplog.text
    assert len(transport.calls) == 1
    alerts.close(timeout=1.0)


def test_close_drops_alerts_still_queued_behind_a_slow_callback() -> None:
    """Alerts not yet handed out when close() runs out of time are dropped, counted
    and recorded."""
    gate = threading.Event()
    alerts = hub(Scripted())

    def slow(_: Alert) -> None:
        gate.wait(5.0)

    alerts.add_callback(slow)
    alerts.emit(alert())
    alerts.emit(alert())
    time.sleep(0.05)
    closer = threading.Thread(target=alerts.close, kwargs={"timeout": 0.05})
    closer.start()
    time.sleep(0.15)
    gate.set()
    closer.join(3.0)
    assert alerts.dropped == 2
    assert [r.status for r in alerts.deliveries()] == [DeliveryStatus.DROPPED] * 2
