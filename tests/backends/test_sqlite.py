"""What only the SQLite key store promises: the file, its schema, concurrency and faults."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from datetime import timedelta
from pathlib import Path

import pytest

from keyguard.backends import KeyBackend, open_key_store
from keyguard.backends.sqlite import _FIND, SCHEMA_VERSION, SQLiteKeyStore
from keyguard.errors import ConfigurationError, InvalidCredential, StorageError
from keyguard.keys import KeyHasher
from keyguard.manager import KeyManager
from keyguard.records import AuditEvent, KeyQuery, KeyRecord, SecretDigest
from keyguard.testing import FakeClock

MakeRecord = Callable[..., KeyRecord]
MakeEvent = Callable[..., AuditEvent]


def raw(db: Path) -> closing[sqlite3.Connection]:
    """A plain driver connection to look at the file behind the store's back."""
    return closing(sqlite3.connect(db, isolation_level=None, check_same_thread=False))


def test_t17_digest_only_storage(db: Path, sqlite_store: SQLiteKeyStore) -> None:
    """Neither the database file nor its WAL ever holds a key or a key's random body."""
    manager = KeyManager(sqlite_store, clock=FakeClock())
    issued = [manager.create(f"canary-{n}-name", owner="canary-owner") for n in range(5)]
    issued.append(manager.rotate(issued[0].record.id, grace=timedelta(hours=1)))
    secrets = [i.key.reveal() for i in issued]
    bodies = [s.split("_", 2)[2] for s in secrets]
    wal = db.with_name(db.name + "-wal")

    def contents() -> bytes:
        return db.read_bytes() + (wal.read_bytes() if wal.exists() else b"")

    while_open = contents()
    assert wal.exists()
    assert b"canary-3-name" in while_open  # the records really are in what was read
    assert KeyHasher().digest(issued[0].key).encode() in while_open
    sqlite_store.close()
    after_close = contents()
    for data in (while_open, after_close):
        for secret, body in zip(secrets, bodies, strict=True):
            assert secret.encode() not in data
            assert body.encode() not in data


# Each child runs this as source: a test module imported by pytest (importlib mode) has
# no importable name in a spawned process, so a function defined here could not be
# unpickled there.
_WORKER = """
from keyguard.backends.sqlite import SQLiteKeyStore
from keyguard.manager import KeyManager

store = SQLiteKeyStore(path)
try:
    manager = KeyManager(store)
    for n in range(count):
        manager.create(f"worker-key-{n}")
finally:
    store.close()
"""


@pytest.mark.slow
def test_four_processes_on_one_new_file_create_exactly_100_keys(db: Path) -> None:
    """Four processes opening a new file at once and writing 25 keys each lose nothing."""
    # spawn, not fork: forking a process that runs threads is unsafe (and warns).
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(target=exec, args=(_WORKER, {"path": str(db), "count": 25}))
        for _ in range(4)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    assert [w.exitcode for w in workers] == [0, 0, 0, 0]
    with closing(SQLiteKeyStore(db)) as store:
        ids = [r.id for r in store.list(KeyQuery(limit=1000)).items]
        assert len(ids) == len(set(ids)) == 100
        assert len(store.audit(limit=1000)) == 100


def test_threads_sharing_one_store_create_every_key(sqlite_store: SQLiteKeyStore) -> None:
    """Eight threads writing through one store (one connection each) lose nothing."""
    manager = KeyManager(sqlite_store)

    def create(worker: int) -> None:
        for n in range(25):
            manager.create(f"thread-{worker}-{n}")

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(create, range(8)))
    ids = [r.id for r in sqlite_store.list(KeyQuery(limit=1000)).items]
    assert len(ids) == len(set(ids)) == 200
    assert len(sqlite_store.audit(limit=1000)) == 200


async def test_async_face_runs_off_the_event_loop_thread(
    sqlite_store: SQLiteKeyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The coroutines run the blocking call in a worker thread, never on the loop's."""
    seen: list[int] = []
    real_get = sqlite_store.get

    def spy(key_id: str) -> KeyRecord | None:
        seen.append(threading.get_ident())
        return real_get(key_id)

    monkeypatch.setattr(sqlite_store, "get", spy)
    assert await sqlite_store.aget("key_nope") is None
    assert seen
    assert threading.get_ident() not in seen


def test_revocation_is_seen_at_once_through_another_store_on_the_file(db: Path) -> None:
    """A key revoked through one store (another process, say) fails at once through the other."""
    clock = FakeClock()
    with closing(SQLiteKeyStore(db)) as first, closing(SQLiteKeyStore(db)) as second:
        issued = KeyManager(first, clock=clock).create("shared")
        reader = KeyManager(second, clock=clock)
        assert reader.authenticate(issued.key).id == issued.record.id
        KeyManager(first, clock=clock).revoke(issued.record.id)
        with pytest.raises(InvalidCredential):
            reader.authenticate(issued.key)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX only")
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_child_gets_a_cache_of_its_own(db: Path) -> None:
    """A child forked while another thread held the record cache's lock, with the
    parent's cache connection open, still looks keys up and sees a revocation made
    after the fork: the cache starts again in the child (``os.register_at_fork``)."""
    with closing(SQLiteKeyStore(db)) as store:
        manager = KeyManager(store)
        issued = manager.create("forked")
        digest = KeyHasher().digest(issued.key)
        assert store.find_cached(digest) is None
        assert store.find(digest) is not None
        assert store.find_cached(digest) is not None  # remembered, connection open
        cache = store._cache
        assert cache is not None
        held, done = threading.Event(), threading.Event()

        def mid_lookup() -> None:  # another thread inside the cache at the fork
            with cache._lock:
                held.set()
                done.wait(10)

        holder = threading.Thread(target=mid_lookup)
        holder.start()
        held.wait(10)
        child = os.fork()
        if child == 0:  # pragma: no cover - runs in the child, which exits below
            code = 1
            try:
                signal.alarm(10)  # a deadlock on the parent's lock ends the child
                found = store.find(digest)
                manager.revoke(issued.record.id)
                after = store.find(digest)
                if found is not None and after is not None and after.revoked_at is not None:
                    code = 0
            finally:
                os._exit(code)
        done.set()
        holder.join()
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        revoked = store.find(digest)  # the parent sees the child's revocation too
        assert revoked is not None
        assert revoked.revoked_at is not None


def test_the_file_uses_wal_and_records_its_schema_version(
    db: Path, sqlite_store: SQLiteKeyStore
) -> None:
    """Opening a new file switches it to WAL and stamps the schema version in user_version."""
    with raw(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION >= 1


def test_find_is_an_indexed_lookup(db: Path, sqlite_store: SQLiteKeyStore) -> None:
    """Finding a key by digest searches primary keys only and never scans a table."""
    with raw(db) as conn:
        plan = " | ".join(row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + _FIND, ("x",)))
    assert "SCAN" not in plan
    assert "USING PRIMARY KEY (digest=?)" in plan


def test_a_new_database_file_is_private_to_its_owner(
    db: Path, sqlite_store: SQLiteKeyStore, make_record: MakeRecord, make_event: MakeEvent
) -> None:
    """The file and its WAL are created readable and writable by their owner only."""
    sqlite_store.save(make_record(1), make_event("key_0001"))
    for path in (db, db.with_name(db.name + "-wal")):
        assert path.stat().st_mode & 0o077 == 0


def test_reopening_a_file_keeps_its_records(
    db: Path, make_record: MakeRecord, make_event: MakeEvent
) -> None:
    """A second store on an existing, current file migrates nothing and sees every record."""
    record = make_record(1)
    with closing(SQLiteKeyStore(db)) as store:
        store.save(record, make_event(record.id))
    with closing(SQLiteKeyStore(db)) as store:
        assert store.get(record.id) == record


def test_a_newer_schema_version_is_a_configuration_error(db: Path) -> None:
    """A file written by a newer keyguard is refused rather than misread."""
    with raw(db) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(ConfigurationError, match="newer"):
        SQLiteKeyStore(db)


def test_a_missing_directory_is_a_configuration_error_naming_it(tmp_path: Path) -> None:
    """A path in a directory that does not exist is refused, and the directory is not made."""
    path = tmp_path / "no-such-dir" / "keys.db"
    with pytest.raises(ConfigurationError, match="no-such-dir"):
        SQLiteKeyStore(path)
    assert not path.parent.exists()


def test_busy_timeout_must_be_a_non_negative_whole_number(db: Path) -> None:
    """A negative or non-integer busy_timeout is refused at construction."""
    for bad in (-1, 1.5, True, "5000"):
        with pytest.raises(ConfigurationError, match="busy_timeout"):
            SQLiteKeyStore(db, busy_timeout=bad)  # type: ignore[arg-type]


def test_from_url_opens_relative_absolute_and_memory_databases(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``sqlite:///rel``, ``sqlite:////abs`` and ``sqlite://:memory:`` each open a store."""
    monkeypatch.chdir(tmp_path)
    with closing(SQLiteKeyStore.from_url("sqlite:///relative.db")):
        assert (tmp_path / "relative.db").exists()
    absolute = tmp_path / "absolute.db"
    with closing(SQLiteKeyStore.from_url(f"sqlite:///{absolute}", busy_timeout=100)):
        assert absolute.exists()
    for url in ("sqlite://:memory:", "sqlite:///:memory:"):
        with closing(SQLiteKeyStore.from_url(url)) as store:
            assert store.get("key_nope") is None


def test_malformed_sqlite_urls_are_configuration_errors() -> None:
    """A SQLite URL without a path, or not a SQLite URL at all, is refused."""
    for url in ("sqlite://", "sqlite:///", "sqlite://host/keys.db", "memory://"):
        with pytest.raises(ConfigurationError, match="sqlite:///"):
            SQLiteKeyStore.from_url(url)


def test_open_key_store_opens_a_sqlite_url(tmp_path: Path) -> None:
    """The registry maps ``sqlite://`` to this store, which offers both faces."""
    store = open_key_store(f"sqlite:///{tmp_path / 'registry.db'}")
    with closing(store):
        assert isinstance(store, SQLiteKeyStore)
        assert isinstance(store, KeyBackend)


def test_an_unknown_scheme_is_a_configuration_error_naming_the_known_ones() -> None:
    """``open_key_store`` refuses an unknown scheme and lists the ones it knows."""
    with pytest.raises(ConfigurationError, match=r"sqlite://") as info:
        open_key_store("postgres://db/keys")
    assert "memory://" in str(info.value)


def test_a_memory_database_is_shared_by_threads_and_private_to_its_store(
    make_record: MakeRecord, make_event: MakeEvent
) -> None:
    """Every thread of a ``:memory:`` store sees one database, which no other store sees."""
    record = make_record(1)
    with closing(SQLiteKeyStore(":memory:")) as store, closing(SQLiteKeyStore(":memory:")) as other:
        store.save(record, make_event(record.id))
        with ThreadPoolExecutor(max_workers=1) as pool:
            assert pool.submit(store.get, record.id).result() == record
        assert other.get(record.id) is None


def test_a_corrupt_file_is_a_storage_error(db: Path) -> None:
    """Junk bytes where the database should be give StorageError, never a driver error."""
    db.write_bytes(b"this is not a database, just junk\x00\xff" * 200)
    with pytest.raises(StorageError) as info:
        SQLiteKeyStore(db)
    assert isinstance(info.value.__cause__, sqlite3.DatabaseError)


def test_a_damaged_row_is_a_storage_error(
    db: Path, sqlite_store: SQLiteKeyStore, make_record: MakeRecord, make_event: MakeEvent
) -> None:
    """A key or audit row whose JSON is broken or incomplete is a StorageError on every read."""
    good, broken = make_record(1), make_record(2)
    for r in (good, broken):
        sqlite_store.save(r, make_event(r.id))
    for junk in ("{not json", '{"id": "key_0002"}', "[1, 2]"):
        with raw(db) as conn:
            conn.execute("UPDATE keys SET data = ? WHERE id = ?", (junk, broken.id))
        with pytest.raises(StorageError, match="damaged"):
            sqlite_store.get(broken.id)
        with pytest.raises(StorageError, match="damaged"):
            sqlite_store.find(broken.digests[0].digest)
        with pytest.raises(StorageError, match="damaged"):
            sqlite_store.list(KeyQuery())
    assert sqlite_store.get(good.id) == good
    with raw(db) as conn:
        conn.execute("UPDATE audit SET data = '{}'")
    with pytest.raises(StorageError, match="damaged"):
        sqlite_store.audit()


def test_a_failed_save_is_a_storage_error_that_changes_nothing(
    sqlite_store: SQLiteKeyStore, make_record: MakeRecord, make_event: MakeEvent
) -> None:
    """A save that breaks a constraint rolls back whole, and its error names no record data."""
    first = make_record(1, digests=(SecretDigest("a" * 64),))
    sqlite_store.save(first, make_event(first.id))
    clash = make_record(2, digests=(SecretDigest("b" * 64), SecretDigest("a" * 64)))
    with pytest.raises(StorageError) as info:
        sqlite_store.save(clash, make_event(clash.id))
    assert isinstance(info.value.__cause__, sqlite3.IntegrityError)
    message = str(info.value)
    assert "a" * 64 not in message
    assert clash.id not in message
    assert clash.name not in message
    assert sqlite_store.get(clash.id) is None
    assert sqlite_store.find("b" * 64) is None
    assert sqlite_store.find("a" * 64) == first
    assert [e.key_id for e in sqlite_store.audit()] == [first.id]


def test_a_write_waits_for_another_writer_within_busy_timeout(
    db: Path, sqlite_store: SQLiteKeyStore, make_record: MakeRecord, make_event: MakeEvent
) -> None:
    """A save blocked by another writer succeeds once the lock is released in time."""
    record = make_record(1)
    with raw(db) as blocker:
        blocker.execute("BEGIN IMMEDIATE")
        timer = threading.Timer(0.1, blocker.execute, ("COMMIT",))
        timer.start()
        sqlite_store.save(record, make_event(record.id))
        timer.join()
    assert sqlite_store.get(record.id) == record


def test_a_write_blocked_past_busy_timeout_is_a_storage_error(
    db: Path, make_record: MakeRecord, make_event: MakeEvent
) -> None:
    """A save still blocked when busy_timeout ends fails with StorageError, after waiting."""
    record = make_record(1)
    with closing(SQLiteKeyStore(db, busy_timeout=50)) as store, raw(db) as blocker:
        blocker.execute("BEGIN IMMEDIATE")
        started = time.monotonic()
        with pytest.raises(StorageError, match="could not save"):
            store.save(record, make_event(record.id))
        assert time.monotonic() - started >= 0.04
        blocker.execute("ROLLBACK")
        assert store.get(record.id) is None


def test_a_removed_file_is_a_storage_error_not_a_new_empty_database(db: Path) -> None:
    """A database file removed under a running store is an error, never silently recreated."""
    with closing(SQLiteKeyStore(db)) as store:
        for leftover in db.parent.glob(db.name + "*"):
            leftover.unlink()
        with pytest.raises(StorageError):
            store.get("key_nope")
        assert not db.exists()


def test_a_closed_store_raises_storage_error(sqlite_store: SQLiteKeyStore) -> None:
    """Every call after close() is a StorageError; closing twice is harmless."""
    sqlite_store.get("key_nope")
    sqlite_store.close()
    sqlite_store.close()
    with pytest.raises(StorageError, match="closed"):
        sqlite_store.get("key_nope")


def test_closing_a_store_while_other_threads_read_it_never_crashes(db: Path) -> None:
    """close() from one thread while four others list keys in a loop: each reader's
    statement finishes before its connection is closed (closing one mid-statement
    crashed the process), and every later call is a StorageError."""
    store = SQLiteKeyStore(db)
    manager = KeyManager(store)
    for n in range(200):
        manager.create(f"k{n}")
    started, stop = threading.Barrier(5), threading.Event()
    outcomes: list[str] = []

    def reader() -> None:
        started.wait()
        while not stop.is_set():
            try:
                store.list(KeyQuery(limit=200))
            except StorageError:
                outcomes.append("closed")
                return
        outcomes.append("stopped")  # pragma: no cover - close() always comes first

    with ThreadPoolExecutor(4) as pool:
        for _ in range(4):
            pool.submit(reader)
        started.wait()
        time.sleep(0.05)
        store.close()
        deadline = time.monotonic() + 10
        while len(outcomes) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        stop.set()
    assert outcomes == ["closed"] * 4
