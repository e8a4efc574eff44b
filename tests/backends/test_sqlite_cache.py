"""The SQLite key store's record cache: served without a query, never stale."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import threading
from contextlib import closing
from pathlib import Path

import pytest

from keyguard.backends.sqlite import _MIGRATIONS, SQLiteKeyStore
from keyguard.backends.sqlite_limiter import SQLiteRateStore
from keyguard.errors import StorageError
from keyguard.keys import KeyHasher
from keyguard.lifecycle import KeyChanges
from keyguard.limiting import HitRequest, LimitPolicy, Window
from keyguard.manager import IssuedKey, KeyManager
from keyguard.records import KeyRecord


@pytest.fixture
def store(sqlite_store: SQLiteKeyStore) -> SQLiteKeyStore:
    """The contract suite's ``store`` is every backend; here, SQLite's key store."""
    return sqlite_store


def digest_of(issued: IssuedKey) -> str:
    return KeyHasher().digest(issued.key)


def cached(store: SQLiteKeyStore, issued: IssuedKey) -> KeyRecord:
    """Look the key up once, so the store remembers it."""
    digest = digest_of(issued)
    found = store.find(digest)
    assert found is not None
    assert store.find_cached(digest) == found
    return found


def test_a_found_record_is_then_answered_from_the_cache(store: SQLiteKeyStore) -> None:
    issued = KeyManager(store).create("k")
    digest = digest_of(issued)
    assert store.find_cached(digest) is None, "nothing is remembered before a lookup"
    record = cached(store, issued)
    assert record.id == issued.record.id
    assert store.find(digest) == record


def test_unknown_digests_are_never_cached(store: SQLiteKeyStore) -> None:
    for n in range(100):
        assert store.find(f"{n:064x}") is None
    assert store._cache is not None
    assert store._cache._records == {}
    assert store.find_cached("0" * 64) is None


def test_the_cache_stays_within_its_bound(db: Path) -> None:
    store = SQLiteKeyStore(db, cache_size=3)
    manager = KeyManager(store)
    issued = [manager.create(f"k{n}") for n in range(7)]
    for key in issued:
        assert store.find(digest_of(key)) is not None
        assert store._cache is not None
        assert len(store._cache._records) <= 3
    assert store.find_cached(digest_of(issued[-1])) is not None
    store.close()


def test_cache_size_zero_remembers_nothing(db: Path) -> None:
    store = SQLiteKeyStore(db, cache_size=0)
    issued = KeyManager(store).create("k")
    assert store.find(digest_of(issued)) is not None
    assert store.find_cached(digest_of(issued)) is None
    store.close()


# -- exactness: a commit by anyone is seen on the very next lookup ------------------------


def change_key(manager: KeyManager, issued: IssuedKey, change: str) -> None:
    key_id = issued.record.id
    if change == "revoke":
        manager.revoke(key_id, reason="leaked")
    elif change == "rotate":
        manager.rotate(key_id)
    elif change == "update":
        manager.update(key_id, KeyChanges(name="renamed"))
    else:
        manager.delete(key_id)


CHANGES = ["delete", "revoke", "rotate", "update"]


def expect_changed(store: SQLiteKeyStore, issued: IssuedKey, change: str) -> None:
    digest = digest_of(issued)
    assert store.find_cached(digest) is None, "the cached record was dropped"
    found = store.find(digest)
    if change == "delete":
        assert found is None
        return
    assert found is not None
    if change == "revoke":
        assert found.revoked_at is not None
    elif change == "rotate":
        assert len(found.digests) == 2  # the new secret, and this one in its grace period
    elif change == "update":
        assert found.name == "renamed"


@pytest.mark.parametrize("change", CHANGES)
def test_a_change_through_another_connection_is_seen_at_once(
    store: SQLiteKeyStore, db: Path, change: str
) -> None:
    issued = KeyManager(store).create("k")
    cached(store, issued)
    other = SQLiteKeyStore(db)
    change_key(KeyManager(other), issued, change)
    other.close()
    expect_changed(store, issued, change)


@pytest.mark.parametrize("change", CHANGES)
def test_a_change_through_this_store_is_seen_at_once(store: SQLiteKeyStore, change: str) -> None:
    manager = KeyManager(store)
    issued = manager.create("k")
    cached(store, issued)
    change_key(manager, issued, change)
    expect_changed(store, issued, change)


def revoke_in_a_thread(manager: KeyManager, issued: IssuedKey) -> None:
    """Revoke through another thread, with a connection of its own; wait for it."""
    writer = threading.Thread(target=manager.revoke, args=(issued.record.id,))
    writer.start()
    writer.join()


def test_a_change_from_another_thread_is_seen_at_once(store: SQLiteKeyStore) -> None:
    """The same store, written from a thread with its own connection."""
    manager = KeyManager(store)
    issued = manager.create("k")
    cached(store, issued)
    revoke_in_a_thread(manager, issued)
    expect_changed(store, issued, "revoke")


_REVOKE = """
import sys
from keyguard.backends.sqlite import _MIGRATIONS, SQLiteKeyStore
from keyguard.backends.sqlite_limiter import SQLiteRateStore
from keyguard.manager import KeyManager
store = SQLiteKeyStore(sys.argv[1])
KeyManager(store).revoke(sys.argv[2], reason="by another process")
store.close()
"""


def test_a_revocation_by_another_process_is_seen_at_once(store: SQLiteKeyStore, db: Path) -> None:
    """As ``keyguard revoke`` on the file while a server runs."""
    issued = KeyManager(store).create("k")
    cached(store, issued)
    subprocess.run([sys.executable, "-c", _REVOKE, str(db), issued.record.id], check=True)
    expect_changed(store, issued, "revoke")
    found = store.find(digest_of(issued))
    assert found is not None
    assert found.revoked_reason == "by another process"


def test_a_lookup_that_raced_a_commit_is_not_kept(store: SQLiteKeyStore, db: Path) -> None:
    """A record read under a version that a commit has since moved past is dropped."""
    issued = KeyManager(store).create("k")
    digest = digest_of(issued)
    assert store._cache is not None
    _, version = store._cache.get(digest)
    stale = store._find(digest)
    assert stale is not None
    other = SQLiteKeyStore(db)
    KeyManager(other).revoke(issued.record.id)
    other.close()
    store._cache.put(digest, stale, version)
    assert store.find_cached(digest) is None


def test_a_lookup_that_raced_this_stores_write_is_not_kept(store: SQLiteKeyStore) -> None:
    issued = KeyManager(store).create("k")
    digest = digest_of(issued)
    assert store._cache is not None
    _, version = store._cache.get(digest)
    stale = store._find(digest)
    assert stale is not None
    KeyManager(store).revoke(issued.record.id)
    store._cache.put(digest, stale, version)
    assert store.find_cached(digest) is None


def test_an_in_memory_store_caches_too() -> None:
    store = SQLiteKeyStore(":memory:")
    manager = KeyManager(store)
    issued = manager.create("k")
    cached(store, issued)
    revoke_in_a_thread(manager, issued)
    expect_changed(store, issued, "revoke")
    store.close()


# -- faces, subclasses, closing --------------------------------------------------------


async def test_afind_answers_a_cached_record_without_a_thread(
    store: SQLiteKeyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    issued = KeyManager(store).create("k")
    record = cached(store, issued)

    async def no_thread(*args: object) -> None:
        raise AssertionError("a cached lookup went to a thread")

    monkeypatch.setattr(asyncio, "to_thread", no_thread)
    assert await store.afind(digest_of(issued)) == record


async def test_afind_of_an_uncached_key_still_works(store: SQLiteKeyStore) -> None:
    issued = KeyManager(store).create("k")
    found = await store.afind(digest_of(issued))
    assert found is not None
    assert store.find_cached(digest_of(issued)) == found


class CountingFinds(SQLiteKeyStore):
    finds = 0

    def find(self, digest: str) -> KeyRecord | None:
        self.finds += 1
        return super().find(digest)


def test_a_subclass_that_overrides_find_sees_every_lookup(db: Path) -> None:
    store = CountingFinds(db)
    issued = KeyManager(store).create("k")
    for _ in range(3):
        assert store.find(digest_of(issued)) is not None
    assert store.find_cached(digest_of(issued)) is None
    assert store.finds == 3
    store.close()


def test_find_cached_after_close_raises(store: SQLiteKeyStore) -> None:
    issued = KeyManager(store).create("k")
    cached(store, issued)
    store.close()
    with pytest.raises(StorageError):
        store.find_cached(digest_of(issued))


def test_writes_to_other_tables_of_the_file_keep_the_cache(store: SQLiteKeyStore, db: Path) -> None:
    """Quota charges and usage rows share the file; they move data_version, not the keys."""
    issued = KeyManager(store).create("k")
    record = cached(store, issued)
    limits = SQLiteRateStore(db)
    for _ in range(3):
        limits.hit(HitRequest(issued.record.id, LimitPolicy(windows=(Window("m", 10, 60),))))
    limits.close()
    assert store.find_cached(digest_of(issued)) == record


def test_a_file_of_the_first_schema_is_migrated_and_its_changes_counted(db: Path) -> None:
    with closing(sqlite3.connect(db, isolation_level=None)) as conn:
        for statement in _MIGRATIONS[0]:
            conn.execute(statement)
        conn.execute("PRAGMA user_version = 1")
    store = SQLiteKeyStore(db)
    issued = KeyManager(store).create("k")
    cached(store, issued)
    other = SQLiteKeyStore(db)
    KeyManager(other).revoke(issued.record.id)
    other.close()
    expect_changed(store, issued, "revoke")
    store.close()


def test_a_busy_file_is_a_miss_never_a_wait_or_an_error(store: SQLiteKeyStore) -> None:
    """The cache may answer on the event loop, so it never waits for a lock: a busy
    or locked file makes its check a miss (and forgets), and the query answers."""
    issued = KeyManager(store).create("k")
    record = cached(store, issued)
    assert store._cache is not None
    real = store._cache._cursor

    class Busy:
        def execute(self, sql: str) -> sqlite3.Cursor:
            raise sqlite3.OperationalError("database is locked")

    store._cache._cursor = Busy()  # type: ignore[assignment]
    assert store.find_cached(digest_of(issued)) is None
    assert store._cache._records == {}
    store._cache._cursor = real
    assert store.find(digest_of(issued)) == record
    assert store.find_cached(digest_of(issued)) == record
