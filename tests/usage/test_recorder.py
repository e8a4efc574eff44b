"""The recorder: exact aggregation, background flushes, and a store that fails."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import pytest

from keyguard.backends.memory_usage import MemoryUsageStore
from keyguard.errors import ConfigurationError, StorageError
from keyguard.testing import FakeClock
from keyguard.usage.recorder import Retention, UsageRecorder
from keyguard.usage.records import Granularity, RowQuery, UsageBatch, UsageEvent

T0 = 1_798_761_600.0
ALL = RowQuery(Granularity.MINUTE, 0, 2**40)


def event(n: int = 0, **changes: Any) -> UsageEvent:
    base = UsageEvent(
        T0 + n,
        "key_1",
        "acme",
        "text:generate",
        "POST",
        "/v1/generate",
        200,
        0.010,
        2,
        None,
        "10.0.0.1",
        f"req-{n}",
    )
    return base._replace(**changes)


class FlakyStore(MemoryUsageStore):
    """Fails its writes while ``down`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.attempts = 0

    def write(self, batch: UsageBatch) -> None:
        self.attempts += 1
        if self.down:
            raise StorageError("usage store down")
        super().write(batch)


def test_events_are_counted_once_per_granularity() -> None:
    store = MemoryUsageStore()
    recorder = UsageRecorder(store)
    for n in range(90):  # 90 seconds: two minutes, one hour, one day
        recorder.record(event(n))
    recorder.close()
    minutes = store.rows(ALL)
    assert sorted(r.counts.requests for r in minutes) == [30, 60]
    (hour,) = store.rows(RowQuery(Granularity.HOUR, 0, 2**40))
    (day,) = store.rows(RowQuery(Granularity.DAY, 0, 2**40))
    assert hour.counts.requests == day.counts.requests == 90
    assert day.counts.units == 180
    assert (day.key_id, day.service, day.owner) == ("key_1", "text:generate", "acme")


def test_failed_and_refused_requests_reach_the_error_log_with_fixed_texts() -> None:
    store = MemoryUsageStore()
    recorder = UsageRecorder(store, error_log_size=2)
    recorder.record(event(1))
    recorder.record(event(2, status=500))
    recorder.record(event(3, status=429, reason="rate_limit_exceeded", units=0))
    recorder.record(event(4, status=418))
    recorder.close()
    entries = store.errors("key_1")
    assert [(e.code, e.message) for e in entries] == [
        ("http_418", "I'm a Teapot"),
        ("rate_limit_exceeded", "Rate limit exceeded."),
    ]
    (day,) = store.rows(RowQuery(Granularity.DAY, 0, 2**40))
    assert (day.counts.errors, day.counts.denied) == (3, 1)
    assert day.counts.reasons == {"rate_limit_exceeded": 1}


def test_a_failing_store_keeps_the_counts_and_gets_them_later() -> None:
    """Nothing is lost while the store is down; the retry writes the sum, once."""
    store = FlakyStore()
    recorder = UsageRecorder(store)
    store.down = True
    for n in range(10):
        recorder.record(event(n))
    recorder.flush()
    assert store.attempts == 1
    recorder.record(event(20))
    recorder.flush()
    store.down = False
    recorder.record(event(30))
    recorder.close()
    (day,) = store.rows(RowQuery(Granularity.DAY, 0, 2**40))
    assert day.counts.requests == 12


def test_store_failures_are_counted_in_telemetry(caplog: pytest.LogCaptureFixture) -> None:
    class Counting:
        def __init__(self) -> None:
            self.stores: list[str] = []

        def storage_error(self, store: str) -> None:
            self.stores.append(store)

    store = FlakyStore()
    store.down = True
    counting = Counting()
    recorder = UsageRecorder(store, telemetry=counting)  # type: ignore[arg-type]
    recorder.record(event())
    recorder.flush()
    recorder.record(event(1))
    recorder.flush()
    assert counting.stores == ["usage", "usage"]
    assert (
        sum("could not write usage" in r.getMessage() for r in caplog.records) == 1
    )  # once a minute
    store.down = False
    recorder.close()


def test_pending_rows_are_bounded_while_the_store_is_down() -> None:
    store = FlakyStore()
    store.down = True
    recorder = UsageRecorder(store, max_pending=6)
    for n in range(5):
        recorder.record(event(n * 60))  # five minutes: 5 minute rows + 1 hour + 1 day
    recorder.flush()
    assert recorder.dropped == 1
    store.down = False
    recorder.close()


def test_listeners_get_each_batch_and_one_that_raises_stops_nothing() -> None:
    store = MemoryUsageStore()
    recorder = UsageRecorder(store)
    seen: list[Sequence[UsageEvent]] = []

    def broken(events: Sequence[UsageEvent]) -> None:
        raise RuntimeError("bug")

    recorder.subscribe(broken)
    recorder.subscribe(seen.append)
    recorder.record(event(1))
    recorder.record(event(2))
    recorder.flush()
    recorder.close()
    # The flusher may drain the first event alone: each event comes exactly once.
    assert [e for batch in seen for e in batch] == [event(1), event(2)]
    assert len(store.rows(ALL)) == 1


def test_the_background_thread_flushes_within_the_interval() -> None:
    store = MemoryUsageStore()
    recorder = UsageRecorder(store, flush_interval=0.05)
    recorder.record(event())
    deadline = time.monotonic() + 5
    while not store.rows(ALL) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert store.rows(ALL)
    recorder.close()


def test_events_are_drained_young_while_writes_wait_for_the_interval() -> None:
    """Queued events are added up within milliseconds, long before the minute's write:
    a second of them kept alive would be promoted by the garbage collector and trigger
    full collections of the heap (tens of milliseconds each, under load)."""
    store = MemoryUsageStore()
    recorder = UsageRecorder(store, flush_interval=60)
    for n in range(100):
        recorder.record(event(n))
    deadline = time.monotonic() + 5
    while recorder._events and time.monotonic() < deadline:
        time.sleep(0.005)
    assert not recorder._events
    assert store.rows(ALL) == []  # drained into the pending batch, not written yet
    recorder.close()
    assert sum(r.counts.requests for r in store.rows(ALL)) == 100


def test_concurrent_recording_from_many_threads_is_exact() -> None:
    store = MemoryUsageStore()
    recorder = UsageRecorder(store, flush_interval=0.01)

    def work() -> None:
        for n in range(500):
            recorder.record(event(n % 120))

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    recorder.close()
    (day,) = store.rows(RowQuery(Granularity.DAY, 0, 2**40))
    assert day.counts.requests == 4000


def test_close_twice_and_record_after_close() -> None:
    store = MemoryUsageStore()
    recorder = UsageRecorder(store)
    recorder.close()
    recorder.close()
    recorder.record(event())  # no thread starts after close; a later flush writes it
    recorder.flush()
    assert len(store.rows(ALL)) == 1


def test_prune_uses_the_retention(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock(T0 + 10 * 86400)
    store = MemoryUsageStore()
    recorder = UsageRecorder(store, clock=clock, retention=Retention(minute=86400))
    recorder.record(event())  # ten days old: its minute row goes, hour and day rows stay
    recorder.flush()
    monkeypatch.setattr("keyguard.usage.recorder._PRUNE_EVERY", 0.0)
    recorder.flush()
    assert store.rows(ALL) == []
    assert store.rows(RowQuery(Granularity.DAY, 0, 2**40))
    recorder.close()


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("flush_interval", 0),
        ("flush_interval", 61),
        ("error_log_size", 0),
        ("error_log_size", True),
    ],
)
def test_bad_options_are_refused(option: str, value: object) -> None:
    with pytest.raises(ConfigurationError):
        UsageRecorder(MemoryUsageStore(), **{option: value})  # type: ignore[arg-type]


def test_a_failed_batch_is_sent_again_unchanged_before_newer_ones() -> None:
    """Same writer, same sequence, same rows: a store that applied part of it can skip
    that part; newer counts wait and go in the next numbered batch."""
    store = FlakyStore()
    sent: list[UsageBatch] = []
    write = store.write

    def spy(batch: UsageBatch) -> None:
        sent.append(batch)
        write(batch)

    store.write = spy  # type: ignore[method-assign]
    recorder = UsageRecorder(store)
    recorder.record(event(1))
    recorder.flush()  # sequence 1, written
    store.down = True
    recorder.record(event(2))
    recorder.flush()  # sequence 2 fails
    recorder.record(event(3))
    recorder.flush()  # sequence 2 again, fails; event 3 waits
    store.down = False
    recorder.flush()  # sequence 2 again, then sequence 3
    recorder.close()
    assert [b.sequence for b in sent] == [1, 2, 2, 2, 3]
    assert len({b.writer for b in sent}) == 1
    assert sent[1] == sent[2] == sent[3]
    (day,) = store.rows(RowQuery(Granularity.DAY, 0, 2**40))
    assert day.counts.requests == 3
