"""Shared helpers for the alert tests: usage events, quota states and a real local
webhook receiver (``http.server`` on 127.0.0.1, port 0)."""

from __future__ import annotations

import calendar
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

import pytest

from keyguard.alerts import EVENT_ID_HEADER, SIGNATURE_HEADER, verify_signature
from keyguard.limiting import LimitKind, LimitState
from keyguard.testing import FakeClock
from keyguard.usage.records import UsageEvent

SECRET = "whsec_test_0123456789abcdef"
DAY = 86400


def quota(at: float, limit: int, used: int, *, monthly: bool = False, name: str = "") -> LimitState:
    """Where a daily (or monthly) quota stands at ``at``: reset at the next UTC boundary."""
    moment = datetime.fromtimestamp(at, UTC)
    if monthly:
        days = calendar.monthrange(moment.year, moment.month)[1]
        start = moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0).timestamp()
        length = days * DAY
    else:
        start = float(int(at // DAY) * DAY)
        length = DAY
    name = name or ("monthly" if monthly else "daily")
    return LimitState(
        name, LimitKind.QUOTA, limit, max(0, limit - used), start + length - at, length
    )


def event(
    at: float,
    *,
    key_id: str = "key_1",
    owner: str | None = "alice",
    status: int = 200,
    reason: str | None = None,
    client_ip: str | None = "203.0.113.7",
    limits: tuple[LimitState, ...] = (),
    route: str = "/v1/chat/completions",
    request_id: str = "req-1",
) -> UsageEvent:
    return UsageEvent(
        at, key_id, owner, "chat", "POST", route, status, 0.01, 1, reason, client_ip,
        request_id, limits,
    )  # fmt: skip


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@dataclass
class Hit:
    """One request the receiver got."""

    at: float
    headers: dict[str, str]
    body: bytes
    verified: bool
    status: int


@dataclass
class Receiver:
    """A webhook receiver that verifies signatures, refuses replays (stale signatures,
    already-handled event ids) and answers from a script of statuses (then 200)."""

    secret: str = SECRET
    script: list[int] = field(default_factory=list)
    delay: float = 0.0
    hits: list[Hit] = field(default_factory=list)
    handled: dict[str, dict[str, Any]] = field(default_factory=dict)
    duplicates: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""

    def answer(self, headers: dict[str, str], body: bytes) -> int:
        if self.delay:
            time.sleep(self.delay)
        verified = verify_signature(self.secret, headers.get(SIGNATURE_HEADER), body)
        with self.lock:
            status = 400
            if verified:
                status = self.script.pop(0) if self.script else 200
                event_id = headers.get(EVENT_ID_HEADER, "")
                if status == 200 and event_id in self.handled:
                    self.duplicates += 1
                elif status == 200:
                    self.handled[event_id] = json.loads(body)
            self.hits.append(Hit(time.monotonic(), headers, body, verified, status))
        return status

    def wait_for(self, count: int, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.handled) < count and time.monotonic() < deadline:
            time.sleep(0.005)


class ReceiverFactory(Protocol):
    def __call__(self, *, script: list[int] | None = None, delay: float = 0.0) -> Receiver: ...


@pytest.fixture
def receiver() -> Iterator[ReceiverFactory]:
    servers: list[ThreadingHTTPServer] = []

    def start(*, script: list[int] | None = None, delay: float = 0.0) -> Receiver:
        state = Receiver(script=list(script or []), delay=delay)

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                status = state.answer(dict(self.headers.items()), body)
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except OSError:  # the sender timed out and hung up: expected when slow
                    pass

            def log_message(self, format: str, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}).start()
        servers.append(server)
        state.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/keyguard"
        return state

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()
