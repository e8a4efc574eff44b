"""Keys in a SQLite file: the embedded default for one machine, zero setup.

Threads of a WSGI server and several processes share the file safely: it runs in WAL
mode (readers never wait for the writer), each thread has its own connection, and each
write is a ``BEGIN IMMEDIATE`` transaction that waits up to ``busy_timeout`` for the
write lock (a deferred transaction that reads and then writes would fail with
SQLITE_BUSY at once, ignoring the timeout). Records are the JSON of
:func:`keyguard.codec.storage_dict` next to the columns listings filter and order on;
the digests of live secrets are indexed in their own table, so authentication is one
indexed lookup. The file holds digests only, never a key. The async face runs each call
in a worker thread so the event loop never waits on disk.

Lookups that found a record are remembered (:class:`_RecordCache`), exactly: an entry
is served only while no key has changed in the file, by any connection, thread or
process (``PRAGMA data_version``, then a counter kept by triggers). A remembered
lookup costs a few microseconds and no thread.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import threading
import uuid
import weakref
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, suppress
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

from ..codec import audit_from_dict, audit_to_dict, record_from_storage, storage_dict
from ..errors import ConfigurationError, StorageError
from ..records import AuditEvent, KeyPage, KeyQuery, KeyRecord, KeyStatus
from ._sqlite import Connections, storage_errors

__all__ = ["SCHEMA_VERSION", "SQLiteKeyStore"]

# Each step moves the schema one version up; steps are only ever appended, so a file
# written by any earlier release can be brought up to date in order.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (  # 1: keys, the digests that find them, and the audit trail
        """CREATE TABLE keys (
            id TEXT PRIMARY KEY,
            owner TEXT,
            plan TEXT NOT NULL,
            revoked_at INTEGER,
            expires_at INTEGER,
            data TEXT NOT NULL
        ) WITHOUT ROWID""",
        "CREATE INDEX keys_by_owner ON keys (owner, id)",
        "CREATE INDEX keys_by_plan ON keys (plan, id)",
        """CREATE TABLE key_digests (
            digest TEXT PRIMARY KEY,
            key_id TEXT NOT NULL REFERENCES keys (id) ON DELETE CASCADE
        ) WITHOUT ROWID""",
        "CREATE INDEX key_digests_by_key ON key_digests (key_id)",
        # AUTOINCREMENT: sequence numbers are never reused, so "newest first" is exact.
        """CREATE TABLE audit (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            key_id TEXT NOT NULL,
            at INTEGER NOT NULL,
            data TEXT NOT NULL
        )""",
        "CREATE INDEX audit_by_key ON audit (key_id, seq)",
    ),
    (  # 2: a counter every change to a key or its digests moves (for the record cache)
        "CREATE TABLE key_changes (one INTEGER PRIMARY KEY CHECK (one = 1), n INTEGER NOT NULL)",
        "INSERT INTO key_changes VALUES (1, 0)",
        "CREATE TRIGGER keys_insert AFTER INSERT ON keys"
        " BEGIN UPDATE key_changes SET n = n + 1; END",
        "CREATE TRIGGER keys_update AFTER UPDATE ON keys"
        " BEGIN UPDATE key_changes SET n = n + 1; END",
        "CREATE TRIGGER keys_delete AFTER DELETE ON keys"
        " BEGIN UPDATE key_changes SET n = n + 1; END",
        "CREATE TRIGGER key_digests_insert AFTER INSERT ON key_digests"
        " BEGIN UPDATE key_changes SET n = n + 1; END",
        "CREATE TRIGGER key_digests_update AFTER UPDATE ON key_digests"
        " BEGIN UPDATE key_changes SET n = n + 1; END",
        "CREATE TRIGGER key_digests_delete AFTER DELETE ON key_digests"
        " BEGIN UPDATE key_changes SET n = n + 1; END",
    ),
)
SCHEMA_VERSION = len(_MIGRATIONS)

_UPSERT = """
    INSERT INTO keys (id, owner, plan, revoked_at, expires_at, data)
    VALUES (?, ?, ?, ?, ?, ?)
    ON CONFLICT (id) DO UPDATE SET
        owner = excluded.owner, plan = excluded.plan, revoked_at = excluded.revoked_at,
        expires_at = excluded.expires_at, data = excluded.data
"""
_FIND = "SELECT k.data FROM key_digests AS d JOIN keys AS k ON k.id = d.key_id WHERE d.digest = ?"
_INSERT_AUDIT = "INSERT INTO audit (key_id, at, data) VALUES (?, ?, ?)"
_NOT_REVOKED = "(revoked_at IS NULL OR revoked_at > :now)"
# The same rules as KeyRecord.status, in SQL: revoked wins over expired.
_STATUS_SQL = {
    KeyStatus.REVOKED: "revoked_at <= :now",
    KeyStatus.EXPIRED: f"{_NOT_REVOKED} AND expires_at <= :now",
    KeyStatus.ACTIVE: f"{_NOT_REVOKED} AND (expires_at IS NULL OR expires_at > :now)",
}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MEMORY = ":memory:"


def _micros(moment: datetime | None) -> int | None:
    """Microseconds since the epoch: exact, and ordered the way the datetimes are."""
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - _EPOCH) // timedelta(microseconds=1)


def _storage_errors(action: str) -> AbstractContextManager[None]:
    return storage_errors("key store", action)


def _stored(text: object, what: str) -> dict[str, Any]:
    """The JSON object a row holds; anything else means the row is damaged."""
    try:
        data = json.loads(text) if isinstance(text, str) else None
    except (ValueError, RecursionError) as exc:
        raise StorageError(f"a stored {what} is damaged") from exc
    if not isinstance(data, dict):
        raise StorageError(f"a stored {what} is damaged")
    return data


def _record(text: object) -> KeyRecord:
    return record_from_storage(_stored(text, "key record"))


def _version(conn: sqlite3.Connection, where: str) -> int:
    """The file's schema version; a newer one than this code knows is refused, not misread."""
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if version > SCHEMA_VERSION:
        raise ConfigurationError(
            f"the key database {where} has schema version {version}, newer than the "
            f"{SCHEMA_VERSION} this keyguard knows; upgrade keyguard"
        )
    return version


def _migrate(conn: sqlite3.Connection, where: str) -> None:
    """Bring the schema to :data:`SCHEMA_VERSION`, in one transaction.

    The version is read again under the write lock, so two processes opening a new
    file at once apply each step exactly once.
    """
    if _version(conn, where) == SCHEMA_VERSION:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = _version(conn, where)
        for number, step in enumerate(_MIGRATIONS[version:], start=version + 1):
            for statement in step:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {number:d}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


_MMAP_BYTES = 256 * 1024 * 1024


class _RecordCache:
    """Records found by digest, served only while no key was changed in the file.

    Two numbers tell. ``PRAGMA data_version``, on a connection of the cache's own that
    never writes (``query_only``), moves whenever any *other* connection commits, in
    this process or another: a few microseconds, no table read. Only when it moved is
    ``key_changes`` read, a counter that triggers move with every change to a key or
    its digests: so the quota charges and usage rows written to the same file do not
    empty the cache, and a key's change by anyone (``keyguard revoke`` in another
    process) does, before the next lookup is answered. Only records are kept, never
    "no such key", so random keys cannot grow it; when full it starts again.

    A lookup that missed reads the row on another connection afterwards, and keeps
    it only if the cache was not emptied meanwhile (:meth:`put`, by ``generation``).
    A change committed before that read but not yet noticed empties the cache at
    the next lookup, so a stale record is never served.
    """

    def __init__(self, connect: Callable[[], sqlite3.Connection], size: int) -> None:
        self._connect = connect
        self._size = size
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._cursor: sqlite3.Cursor | None = None
        self._version: int | None = None  # data_version when last checked
        self._changes: int | None = None  # key_changes.n when last read
        self._generation = 0  # moves each time the records are forgotten
        self._records: dict[str, KeyRecord] = {}
        self._closed = False
        # A connection must not cross fork(): the child starts with none and a free lock.
        os.register_at_fork(after_in_child=_forget_in_child(weakref.ref(self)))

    def get(self, digest: str) -> tuple[KeyRecord | None, int]:
        """The remembered record (or ``None``), and the generation to :meth:`put` under."""
        with self._lock:
            cursor = self._cursor or self._open()
            try:  # no context manager: this is the hot path, ~5 us in all
                version: int = cursor.execute("PRAGMA data_version").fetchone()[0]
                if version != self._version:
                    changes: int = cursor.execute("SELECT n FROM key_changes").fetchone()[0]
                    if changes != self._changes:
                        self._forget()
                        self._changes = changes
                    self._version = version
            except sqlite3.OperationalError:
                # Busy or locked: not known without waiting, and this may run on the
                # event loop (no busy timeout here): a miss, which a query answers.
                self._forget()
                self._version = None
                return None, self._generation
            except sqlite3.Error as exc:
                raise StorageError("the SQLite key store could not look up a key") from exc
            return self._records.get(digest), self._generation

    def _open(self) -> sqlite3.Cursor:
        if self._closed:
            raise StorageError("the SQLite key store is closed")
        self._conn = self._connect()
        self._cursor = self._conn.cursor()
        return self._cursor

    def put(self, digest: str, record: KeyRecord, generation: int) -> None:
        """Keep ``record``, read after :meth:`get` gave ``generation``, unless the
        records were forgotten since."""
        with self._lock:
            if generation == self._generation:
                if len(self._records) >= self._size:
                    self._records.clear()
                self._records[digest] = record

    def clear(self) -> None:
        """Forget every record, and any lookup under way (this store just wrote)."""
        with self._lock:
            self._forget()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._forget()
            conn, self._conn, self._cursor = self._conn, None, None
        if conn is not None:
            with _storage_errors("close the database"):
                conn.close()

    def _forget(self) -> None:
        self._records.clear()
        self._generation += 1

    def after_fork(self) -> None:
        self._lock = threading.Lock()
        self._forget()
        self._version = self._changes = None
        if self._conn is not None:
            # Kept open: closing the parent's connection here could drop its file locks.
            _LEFT_BY_FORK.append(self._conn)
            self._conn = self._cursor = None


_LEFT_BY_FORK: list[sqlite3.Connection] = []


def _forget_in_child(ref: weakref.ref[_RecordCache]) -> Callable[[], None]:
    def forget() -> None:
        cache = ref()
        if cache is not None:
            cache.after_fork()

    return forget


class SQLiteKeyStore:
    """A key store in one SQLite file, with both the sync and the async face.

    :param path: the database file, or ``":memory:"`` for a private in-memory database
        shared by this store's threads. The file is created if missing; its directory
        is not (a missing directory is a :class:`ConfigurationError`), so a typo in a
        path cannot silently start an empty key database somewhere else.
    :param busy_timeout: milliseconds a write waits for another writer before giving
        up with :class:`StorageError`.
    :param cache_size: records remembered by digest (``0``: none); see :meth:`find_cached`.
        A subclass that overrides ``find`` (to count, wrap or fail lookups) has no
        cache, so that its ``find`` sees every lookup.

    **Security note**: the file holds digests and display hints, never a key. Without
    a pepper (see :class:`keyguard.KeyHasher`) the digests are plain SHA-256 of
    high-entropy keys; treat the file as confidential all the same.

    .. versionadded:: 0.1
    """

    # The async face is the sync one in a worker thread: a caller may run several
    # calls in one thread itself (see Guard.acheck).
    threaded: ClassVar[bool] = True

    def __init__(
        self, path: str | os.PathLike[str], *, busy_timeout: int = 5000, cache_size: int = 10_000
    ) -> None:
        if isinstance(busy_timeout, bool) or not isinstance(busy_timeout, int) or busy_timeout < 0:
            raise ConfigurationError("busy_timeout must be a whole number of milliseconds >= 0")
        if isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 0:
            raise ConfigurationError("cache_size must be a whole number >= 0")
        # Lookups walk two B-trees; reading their pages through a memory map instead
        # of read() calls keeps a lookup's cost nearly flat as the file outgrows
        # SQLite's page cache (a no-op for :memory:).
        self._db = Connections(
            "key store",
            timeout=busy_timeout / 1000,
            pragmas=("PRAGMA foreign_keys = ON", f"PRAGMA mmap_size = {_MMAP_BYTES:d}"),
        )
        self._anchor: sqlite3.Connection | None = None
        if os.fspath(path) == _MEMORY:
            self._where = _MEMORY
            # A named memdb database is shared by this store's connections (and only
            # theirs) and, unlike shared-cache mode, honours busy_timeout.
            self._db.uri = f"file:/keyguard-{uuid.uuid4().hex}?vfs=memdb"
            setup = self._db.connect(self._db.uri)
        else:
            # Absolute now, so a later chdir cannot point new threads at another file.
            file = Path(path).absolute()
            self._where = repr(str(file))
            if not file.parent.is_dir():
                raise ConfigurationError(
                    f"the directory of the key database {self._where} does not exist"
                )
            # Threads open with mode=rw: a file removed under a running server becomes
            # an error, never a silently empty key database.
            self._db.uri = file.as_uri() + "?mode=rw"
            # Created owner-only; SQLite gives the -wal and -shm files the same mode.
            with suppress(OSError):  # exists already, or unwritable: connect() reports it
                os.close(os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            setup = self._db.connect(file.as_uri() + "?mode=rwc")
        try:
            with _storage_errors("open the database"):
                self._prepare(setup)
        except BaseException:
            setup.close()
            raise
        if self._where == _MEMORY:
            self._anchor = setup  # the database lives as long as one connection does
        else:
            setup.close()
        # A subclass's own find must see every lookup (see cache_size).
        cached = cache_size and type(self).find is SQLiteKeyStore.find
        self._cache = _RecordCache(self._cache_connection, cache_size) if cached else None

    @classmethod
    def from_url(cls, url: str, **options: Any) -> SQLiteKeyStore:
        """``sqlite:///relative.db``, ``sqlite:////absolute/path.db`` or ``sqlite://:memory:``."""
        rest = url.removeprefix("sqlite://")
        if rest in (_MEMORY, "/" + _MEMORY):
            return cls(_MEMORY, **options)
        if rest == url or not rest.startswith("/") or len(rest) == 1:
            raise ConfigurationError(
                "a SQLite URL reads sqlite:///relative/path.db, sqlite:////absolute/path.db "
                "or sqlite://:memory:"
            )
        return cls(rest[1:], **options)

    def __repr__(self) -> str:
        return f"SQLiteKeyStore({self._where})"

    # connections

    def _prepare(self, conn: sqlite3.Connection) -> None:
        if self._where != _MEMORY:
            # Persistent in the file; synchronous stays FULL so a committed revocation
            # survives a power cut.
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise ConfigurationError(f"the key database {self._where} cannot use WAL mode")
        _migrate(conn, self._where)

    def _cache_connection(self) -> sqlite3.Connection:
        conn = self._db.connect(self._db.uri)
        with _storage_errors("open the database"):
            conn.execute("PRAGMA query_only = ON")  # the cache's reader never writes
            conn.execute("PRAGMA busy_timeout = 0")  # nor waits: busy is a miss (get)
        return conn

    def _read(
        self, action: str, sql: str, params: Sequence[object] | dict[str, object]
    ) -> list[Any]:
        with self._db.use() as conn, _storage_errors(action):
            return conn.execute(sql, params).fetchall()

    # sync face

    def get(self, key_id: str) -> KeyRecord | None:
        rows = self._read("read a key", "SELECT data FROM keys WHERE id = ?", (key_id,))
        return _record(rows[0][0]) if rows else None

    def find(self, digest: str) -> KeyRecord | None:
        cache = self._cache
        if cache is None:
            return self._find(digest)
        record, generation = cache.get(digest)
        if record is None:
            record = self._find(digest)
            if record is not None:
                cache.put(digest, record, generation)
        return record

    def find_cached(self, digest: str) -> KeyRecord | None:
        """The record ``find`` would return, when it is remembered; else ``None``, which
        means "ask ``find``", never "no such key" (those are not remembered).

        Exact: served only while no key changed in the file since the record was read
        (see :class:`_RecordCache`); a revocation by another process (``keyguard
        revoke``) counts from the very next lookup. No I/O but a ``PRAGMA``, no thread.
        """
        if self._cache is None:
            return None
        return self._cache.get(digest)[0]

    def _find(self, digest: str) -> KeyRecord | None:
        rows = self._read("look up a key", _FIND, (digest,))
        return _record(rows[0][0]) if rows else None

    def _wrote(self) -> None:
        # The cache would notice by itself at its next lookup; this also drops the
        # lookups under way at once, whatever the timing.
        if self._cache is not None:
            self._cache.clear()

    def save(self, record: KeyRecord, event: AuditEvent) -> None:
        """Write the record, index all its digests and append ``event``, atomically."""
        row = (
            record.id,
            record.owner,
            record.plan,
            _micros(record.revoked_at),
            _micros(record.expires_at),
            json.dumps(storage_dict(record), separators=(",", ":")),
        )
        digests = [(d.digest, record.id) for d in record.digests]
        audit = self._audit_row(event)
        try:
            with self._db.write("save a key") as conn:
                conn.execute(_UPSERT, row)
                conn.execute("DELETE FROM key_digests WHERE key_id = ?", (record.id,))
                conn.executemany("INSERT INTO key_digests (digest, key_id) VALUES (?, ?)", digests)
                conn.execute(_INSERT_AUDIT, audit)
        finally:
            self._wrote()

    def delete(self, key_id: str, event: AuditEvent) -> bool:
        """Remove the record and its digests; ``False`` (and no audit event) if unknown."""
        audit = self._audit_row(event)
        try:
            with self._db.write("delete a key") as conn:
                # the foreign key's ON DELETE CASCADE removes the digests in the same step
                if conn.execute("DELETE FROM keys WHERE id = ?", (key_id,)).rowcount == 0:
                    return False
                conn.execute(_INSERT_AUDIT, audit)
        finally:
            self._wrote()
        return True

    def list(self, query: KeyQuery) -> KeyPage:
        """A page of keys in id (creation) order, filtered and cut in SQL."""
        if query.limit < 1:
            raise ValueError("query.limit must be at least 1")
        clauses: list[str] = []
        params: dict[str, object] = {"limit": query.limit + 1}
        if query.after is not None:
            clauses.append("id > :after")
            params["after"] = query.after
        if query.owner is not None:
            clauses.append("owner = :owner")
            params["owner"] = query.owner
        if query.plan is not None:
            clauses.append("plan = :plan")
            params["plan"] = query.plan
        if query.status is not None:
            if query.now is None:
                raise ValueError("a status filter needs query.now")
            clauses.append(_STATUS_SQL[query.status])
            params["now"] = _micros(query.now)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        # Only constant fragments are joined; every value is a bound parameter.
        sql = f"SELECT data FROM keys{where} ORDER BY id LIMIT :limit"  # noqa: S608
        records = [_record(row[0]) for row in self._read("list keys", sql, params)]
        if len(records) > query.limit:
            return KeyPage(tuple(records[: query.limit]), records[query.limit - 1].id)
        return KeyPage(tuple(records), None)

    def audit(self, key_id: str | None = None, limit: int = 100) -> Sequence[AuditEvent]:
        """The newest audit events first, for one key or for all."""
        if limit < 1:
            return []
        sql = "SELECT data FROM audit ORDER BY seq DESC LIMIT ?"
        params: tuple[object, ...] = (limit,)
        if key_id is not None:
            sql = "SELECT data FROM audit WHERE key_id = ? ORDER BY seq DESC LIMIT ?"
            params = (key_id, limit)
        rows = self._read("read the audit trail", sql, params)
        return [audit_from_dict(_stored(row[0], "audit event")) for row in rows]

    def close(self) -> None:
        """Close every thread's connection; later calls raise :class:`StorageError`."""
        self._db.close()
        if self._cache is not None:
            self._cache.close()
        anchor, self._anchor = self._anchor, None
        if anchor is not None:
            with _storage_errors("close the database"):
                anchor.close()

    @staticmethod
    def _audit_row(event: AuditEvent) -> tuple[str, int | None, str]:
        return (event.key_id, _micros(event.at), json.dumps(audit_to_dict(event)))

    # async face: each call runs in a worker thread, which has its own connection

    async def aget(self, key_id: str) -> KeyRecord | None:
        return await asyncio.to_thread(self.get, key_id)

    async def afind(self, digest: str) -> KeyRecord | None:
        found = self.find_cached(digest)  # a remembered record needs no thread
        return found if found is not None else await asyncio.to_thread(self.find, digest)

    async def asave(self, record: KeyRecord, event: AuditEvent) -> None:
        await asyncio.to_thread(self.save, record, event)

    async def adelete(self, key_id: str, event: AuditEvent) -> bool:
        return await asyncio.to_thread(self.delete, key_id, event)

    async def alist(self, query: KeyQuery) -> KeyPage:
        return await asyncio.to_thread(self.list, query)

    async def aaudit(self, key_id: str | None = None, limit: int = 100) -> Sequence[AuditEvent]:
        return await asyncio.to_thread(self.audit, key_id, limit)

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)
