"""Delivery off the request path: one worker thread, a bounded queue, retries.

Alerts are queued (a deque append under a lock; nothing waits on I/O) and the worker
calls the Python callbacks, then POSTs each webhook. A failed attempt is scheduled
again after an exponential, jittered wait, in a heap, so a receiver that is down
delays only its own deliveries — never the callbacks, other receivers' retries or
the thread that queued the alert. Only one attempt runs at a time; each is bounded by
the retry policy's timeout. The last ``history_size`` deliveries per owner are kept
for the dashboard.
"""

from __future__ import annotations

import enum
import heapq
import http.client
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from urllib.parse import urlsplit

from .bounded import Bounded
from .config import RetryPolicy, Webhook
from .model import Alert, AlertKind
from .signing import EVENT_ID_HEADER, EVENT_KIND_HEADER, SIGNATURE_HEADER, signature_header
from .transport import Response, Transport
from .urls import BlockedAddress

__all__ = ["AlertCallback", "DeliveryRecord", "DeliveryStatus", "Dispatcher"]

_logger = logging.getLogger("keyguard")
AlertCallback = Callable[[Alert], None]
_MAX_OWNERS = 100_000
_LOG_EVERY = 60.0


class DeliveryStatus(enum.StrEnum):
    """Where one delivery stands; only ``pending`` ever changes."""

    PENDING = "pending"  # queued, or waiting to be retried
    DELIVERED = "delivered"  # a 2xx answer
    FAILED = "failed"  # refused (4xx other than 408/429) or retry budget spent
    DROPPED = "dropped"  # the queue was full, or shut down before it could be sent


@dataclass(frozen=True, slots=True)
class DeliveryRecord:
    """One alert to one webhook, as the dashboard shows it.

    ``target`` is the receiver's scheme and host only: a webhook path is often a token.
    ``error`` is an exception type name (``TimeoutError``) when no answer came.
    """

    event_id: str
    kind: AlertKind
    key_id: str
    target: str
    at: float
    status: DeliveryStatus
    attempts: int = 0
    http_status: int | None = None
    error: str | None = None


@dataclass(slots=True, eq=False)
class _Job:
    alert: Alert
    hook: Webhook
    owner: str | None
    body: bytes
    record: DeliveryRecord


def _target(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


class Dispatcher:
    """The worker: queue, callbacks, signed POSTs, retries and the delivery history.

    The thread starts with the first alert (no thread for a process that never
    alerts) and is a daemon; :meth:`close` stops it within a bound.
    """

    def __init__(
        self,
        *,
        retry: RetryPolicy,
        queue_size: int,
        history_size: int,
        transport: Transport,
        jitter: Callable[[], float],
        callbacks: Sequence[AlertCallback] = (),
    ) -> None:
        self.retry = retry
        self.queue_size = queue_size
        self.history_size = history_size
        self.transport = transport
        self.jitter = jitter
        self.callbacks = list(callbacks)
        self.dropped = 0
        self._cond = threading.Condition()
        self._incoming: deque[tuple[Alert, tuple[tuple[str | None, Webhook], ...]]] = deque()
        self._heap: list[tuple[float, int, _Job]] = []
        self._order = itertools.count()
        self._history: Bounded[str | None, Bounded[tuple[str, str], DeliveryRecord]]
        self._history = Bounded(_MAX_OWNERS)
        self._busy = False
        self._closing = False
        self._deadline = 0.0
        self._thread: threading.Thread | None = None
        self._logged_at = -_LOG_EVERY

    def submit(self, alert: Alert, hooks: Sequence[tuple[str | None, Webhook]]) -> bool:
        """Queue ``alert`` for the callbacks and ``hooks`` (owner, webhook); never blocks
        on I/O. ``False`` when the queue is full or closed (the alert is dropped)."""
        with self._cond:
            if self._closing or len(self._incoming) >= self.queue_size:
                self._drop_locked(alert, hooks)
                return False
            self._incoming.append((alert, tuple(hooks)))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="keyguard-alerts", daemon=True
                )
                self._thread.start()
            self._cond.notify()
        return True

    def history(self, owner: str | None) -> list[DeliveryRecord]:
        with self._cond:
            records = self._history.get(owner)
            return [] if records is None else records.values()[::-1]

    def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is queued, retrying or being sent; ``False`` on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._incoming or self._heap or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self, timeout: float) -> None:
        """Stop taking alerts; retry what is pending at once (no more backoff) until
        ``timeout``, then drop the rest. Harmless to call twice."""
        with self._cond:
            if not self._closing:
                self._closing = True
                self._deadline = time.monotonic() + timeout
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout + self.retry.timeout + 1.0)

    # the worker

    def _run(self) -> None:
        while True:
            with self._cond:
                item = self._next_locked()
                if item is None:
                    self._cond.notify_all()
                    return
                self._busy = True
            try:
                if isinstance(item, _Job):
                    self._attempt(item)
                else:
                    self._fan_out(*item)
            except Exception as exc:  # the worker must outlive any bug
                _logger.error("keyguard alert delivery failed: %s", type(exc).__name__)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _next_locked(
        self,
    ) -> _Job | tuple[Alert, tuple[tuple[str | None, Webhook], ...]] | None:
        while True:
            now = time.monotonic()
            if self._closing and now >= self._deadline:
                self._abandon_locked()
                return None
            if self._incoming:
                return self._incoming.popleft()
            if self._heap and (self._closing or self._heap[0][0] <= now):
                return heapq.heappop(self._heap)[2]
            if self._closing and not self._heap:
                return None
            wait = self._deadline - now if self._closing else None
            if self._heap:
                wait = self._heap[0][0] - now
            self._cond.wait(wait)

    def _fan_out(self, alert: Alert, hooks: tuple[tuple[str | None, Webhook], ...]) -> None:
        for callback in self.callbacks:
            try:
                callback(alert)
            except Exception as exc:  # one callback's bug stops nothing
                _logger.error("keyguard alert callback failed: %s", type(exc).__name__)
        body = alert.to_json()
        for owner, hook in hooks:
            record = DeliveryRecord(
                alert.id,
                alert.kind,
                alert.key_id,
                _target(hook.url),
                alert.at,
                DeliveryStatus.PENDING,
            )
            job = _Job(alert, hook, owner, body, record)
            with self._cond:
                if len(self._heap) >= self.queue_size:
                    self._note_locked(job, status=DeliveryStatus.DROPPED)
                    self._count_drop_locked()
                    continue
                self._note_locked(job)
                heapq.heappush(self._heap, (time.monotonic(), next(self._order), job))

    def _attempt(self, job: _Job) -> None:
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "keyguard-webhooks/1",
            SIGNATURE_HEADER: signature_header(job.hook.secret, job.body),
            EVENT_ID_HEADER: job.alert.id,
            EVENT_KIND_HEADER: job.alert.kind.value,
        }
        attempts = job.record.attempts + 1
        answer: Response | None = None
        error: str | None = None
        give_up = False
        try:
            answer = self.transport(job.hook, job.body, headers, self.retry.timeout)
        except BlockedAddress:
            error, give_up = "BlockedAddress", True
        except (OSError, http.client.HTTPException) as exc:
            error = type(exc).__name__
        except Exception as exc:  # a transport bug: retrying would repeat it
            error, give_up = type(exc).__name__, True
        code = None if answer is None else answer.status
        with self._cond:
            if code is not None and 200 <= code < 300:
                self._note_locked(job, DeliveryStatus.DELIVERED, attempts, code, None)
                return
            retryable = not give_up and (code is None or code >= 500 or code in (408, 429))
            if not retryable or attempts >= self.retry.attempts:
                self._note_locked(job, DeliveryStatus.FAILED, attempts, code, error)
                return
            self._note_locked(job, DeliveryStatus.PENDING, attempts, code, error)
            delay = self.retry.delay(attempts, self.jitter())
            if answer is not None and answer.retry_after is not None:
                delay = max(delay, min(answer.retry_after, self.retry.cap))
            heapq.heappush(self._heap, (time.monotonic() + delay, next(self._order), job))

    def _note_locked(
        self,
        job: _Job,
        status: DeliveryStatus = DeliveryStatus.PENDING,
        attempts: int | None = None,
        http_status: int | None = None,
        error: str | None = None,
    ) -> None:
        job.record = replace(
            job.record,
            status=status,
            attempts=job.record.attempts if attempts is None else attempts,
            http_status=http_status,
            error=error,
        )
        records = self._history.get(job.owner)
        if records is None:
            records = Bounded(self.history_size)
            self._history.put(job.owner, records)
        records.put((job.alert.id, job.hook.url), job.record)

    def _drop_locked(self, alert: Alert, hooks: Sequence[tuple[str | None, Webhook]]) -> None:
        self._count_drop_locked()
        for owner, hook in hooks:
            record = DeliveryRecord(
                alert.id,
                alert.kind,
                alert.key_id,
                _target(hook.url),
                alert.at,
                DeliveryStatus.DROPPED,
            )
            self._note_locked(_Job(alert, hook, owner, b"", record), DeliveryStatus.DROPPED)

    def _abandon_locked(self) -> None:
        while self._incoming:
            self._drop_locked(*self._incoming.popleft())
        while self._heap:
            job = heapq.heappop(self._heap)[2]
            self._count_drop_locked()
            record = job.record
            self._note_locked(job, DeliveryStatus.DROPPED, None, record.http_status, record.error)

    def _count_drop_locked(self) -> None:
        self.dropped += 1
        now = time.monotonic()
        if now - self._logged_at >= _LOG_EVERY:
            self._logged_at = now
            _logger.warning("keyguard dropped alerts (%d so far)", self.dropped)
