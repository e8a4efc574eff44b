"""SQLite rate store: async releases that ride on the next write, and the writer lock."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path

import pytest

from keyguard.backends.sqlite import SQLiteKeyStore
from keyguard.backends.sqlite_limiter import SQLiteRateStore
from keyguard.errors import ConfigurationError, StorageError
from keyguard.limiting import HitRequest, LimitPolicy, Window
from keyguard.testing import FakeClock

START = datetime(2027, 1, 15, 12, tzinfo=UTC)
CAP = LimitPolicy(windows=(Window("minute", 100, 60),), concurrency=2)


def stored_leases(path: Path, bucket: str) -> set[str]:
    """The leases the bucket's row holds on disk, whatever this process has queued."""
    with closing(sqlite3.connect(path)) as conn:
        row = conn.execute("SELECT state FROM rl_buckets WHERE bucket = ?", (bucket,)).fetchone()
    return set() if row is None else set(json.loads(row[0])["l"])


def in_flight(store: SQLiteRateStore, bucket: str) -> int:
    (_, slots) = store.peek(bucket, CAP)
    return slots.limit - slots.remaining


@pytest.fixture
def store(tmp_path: Path) -> SQLiteRateStore:
    return SQLiteRateStore(tmp_path / "rl.db", clock=FakeClock(START), release_delay=1)


async def test_an_async_release_frees_the_slot_for_this_process_at_once(
    store: SQLiteRateStore, tmp_path: Path
) -> None:
    """Queued, a release is already free to peek and to the next hit, which writes it."""
    assert store.hit(HitRequest("k", CAP, lease="a")).allowed
    assert store.hit(HitRequest("k", CAP, lease="b")).allowed
    await store.arelease("k", "a")
    assert stored_leases(tmp_path / "rl.db", "k") == {"a", "b"}  # not written yet
    assert in_flight(store, "k") == 1
    assert store.hit(HitRequest("k", CAP, lease="c")).allowed  # the cap of 2 is not hit
    assert stored_leases(tmp_path / "rl.db", "k") == {"b", "c"}
    assert not store.hit(HitRequest("k", CAP, lease="d")).allowed
    store.close()


async def test_pending_releases_are_written_after_the_delay(tmp_path: Path) -> None:
    """With no hit to ride on, the releases are written together release_delay later."""
    store = SQLiteRateStore(tmp_path / "rl.db", clock=FakeClock(START), release_delay=0.01)
    for lease in ("a", "b"):
        assert store.hit(HitRequest("k", CAP, lease=lease)).allowed
        await store.arelease("k", lease)
    for _ in range(200):
        if not stored_leases(tmp_path / "rl.db", "k"):
            break
        await asyncio.sleep(0.01)
    assert stored_leases(tmp_path / "rl.db", "k") == set()
    store.close()


async def test_close_writes_pending_releases_and_later_releases_are_refused(
    store: SQLiteRateStore, tmp_path: Path
) -> None:
    """A graceful close loses no release; a release after it is a StorageError."""
    assert store.hit(HitRequest("k", CAP, lease="a")).allowed
    await store.arelease("k", "a")
    store.close()
    assert stored_leases(tmp_path / "rl.db", "k") == set()
    with pytest.raises(StorageError):
        await store.arelease("k", "b")


async def test_a_failed_hit_keeps_the_releases_it_carried(
    store: SQLiteRateStore, tmp_path: Path
) -> None:
    """A hit that fails puts its queued releases back for the next write."""
    assert store.hit(HitRequest("k", CAP, lease="a")).allowed
    await store.arelease("k", "a")
    with pytest.raises(ValueError, match="lease"):
        store.hit(HitRequest("k", CAP))  # a capped policy needs a lease: refused
    assert in_flight(store, "k") == 0
    store.close()
    assert stored_leases(tmp_path / "rl.db", "k") == set()


async def test_reset_drops_pending_releases(store: SQLiteRateStore) -> None:
    """A reset bucket starts empty: its queued releases go with it."""
    assert store.hit(HitRequest("k", CAP, lease="a")).allowed
    await store.arelease("k", "a")
    store.reset("k")
    assert in_flight(store, "k") == 0
    store.close()


@pytest.mark.parametrize("bad", [-0.1, 1.5, True, "0.1"])
def test_release_delay_must_be_seconds_in_zero_to_one(tmp_path: Path, bad: object) -> None:
    """A release_delay outside [0, 1] (or not a number) is refused at construction."""
    with pytest.raises(ConfigurationError, match="release_delay"):
        SQLiteRateStore(tmp_path / "rl.db", release_delay=bad)  # type: ignore[arg-type]


def test_a_writer_of_this_process_waits_for_another_within_busy_timeout(tmp_path: Path) -> None:
    """Writers of one process queue on a lock per file, bounded by busy_timeout."""
    path = tmp_path / "kg.db"
    keys = SQLiteKeyStore(path)
    limits = SQLiteRateStore(path, clock=FakeClock(START), busy_timeout=50)
    held, done = threading.Event(), threading.Event()

    def hold() -> None:
        with keys._db.write("hold the lock"):
            held.set()
            done.wait(5)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(5)
        with pytest.raises(StorageError, match="busy"):
            limits.hit(HitRequest("k", CAP, lease="a"))
    finally:
        done.set()
        holder.join()
    assert limits.hit(HitRequest("k", CAP, lease="a")).allowed
    keys.close()
    limits.close()
