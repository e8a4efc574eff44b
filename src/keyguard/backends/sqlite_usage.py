"""Usage in a SQLite file: exact across the worker processes of one machine.

A row's counts are the JSON of :meth:`UsageCounts.to_json`. ``write`` adds a batch in
one ``BEGIN IMMEDIATE`` transaction: the write lock is taken before a row is read, so
read, merge and write back cannot interleave with another process's, and batches from
several processes sum exactly; a failure rolls the whole batch back, so a flush that
the recorder retries is never counted twice. Rows are keyed by granularity, key, start
and service (in that order, so one key's time range is one index range); owner and
time-range queries have indexes of their own. Each key's error log is trimmed to the
batch's ``error_log_size`` newest entries in the same transaction.

Tables are prefixed ``usage_`` so the file can be shared with the key and rate stores;
the schema version sits in ``usage_meta``. ``synchronous=NORMAL`` (safe in WAL mode)
keeps flushes cheap: a process crash loses nothing committed, a power cut may lose the
last flush. The async face runs each call in a worker thread.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from ..errors import ConfigurationError, StorageError
from ..usage.records import ErrorEntry, Granularity, RowQuery, UsageBatch, UsageCounts, UsageRow
from ._sqlite import Connections, file_path, open_file, storage_errors

__all__ = ["SCHEMA_VERSION", "SQLiteUsageStore"]

_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (  # 1: rows of counts, and the error log
        """CREATE TABLE usage_rows (
            granularity TEXT NOT NULL,
            key_id TEXT NOT NULL,
            start INTEGER NOT NULL,
            service TEXT NOT NULL,
            owner TEXT,
            counts TEXT NOT NULL,
            PRIMARY KEY (granularity, key_id, start, service)
        ) WITHOUT ROWID""",
        "CREATE INDEX usage_rows_by_time ON usage_rows (granularity, start)",
        "CREATE INDEX usage_rows_by_owner ON usage_rows (owner, granularity, start)",
        # AUTOINCREMENT: sequence numbers are never reused, so "newest first" is exact.
        """CREATE TABLE usage_errors (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            key_id TEXT NOT NULL,
            data TEXT NOT NULL
        )""",
        "CREATE INDEX usage_errors_by_key ON usage_errors (key_id, seq)",
    ),
)
SCHEMA_VERSION = len(_MIGRATIONS)

_SELECT_ROW = """
    SELECT counts FROM usage_rows
    WHERE granularity = ? AND key_id = ? AND start = ? AND service = ?
"""
_UPSERT_ROW = """
    INSERT INTO usage_rows (granularity, key_id, start, service, owner, counts)
    VALUES (?, ?, ?, ?, ?, ?)
    ON CONFLICT (granularity, key_id, start, service) DO UPDATE SET
        owner = excluded.owner, counts = excluded.counts
"""
# Everything but the newest ``?`` entries of a key: the entry ``?`` places past the
# newest and all older ones.
_TRIM_ERRORS = """
    DELETE FROM usage_errors WHERE key_id = ? AND seq <= (
        SELECT seq FROM usage_errors WHERE key_id = ? ORDER BY seq DESC LIMIT 1 OFFSET ?
    )
"""
_SELECT_COLUMNS = "SELECT granularity, start, key_id, service, owner, counts FROM usage_rows"
# SQLite allows at least 999 bound parameters per statement; key lists go in chunks.
_KEY_CHUNK = 500


def _storage_errors(action: str) -> AbstractContextManager[None]:
    return storage_errors("usage store", action)


def _counts(text: str) -> UsageCounts:
    """A stored row's counts; anything unreadable means the row is damaged."""
    try:
        return UsageCounts.from_json(text)
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
        raise StorageError("a stored usage row is damaged") from exc


def _entry(text: str) -> ErrorEntry:
    try:
        return ErrorEntry.from_json(text)
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
        raise StorageError("a stored error entry is damaged") from exc


def _version(conn: sqlite3.Connection) -> int:
    found = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'usage_meta'"
    ).fetchone()
    if found is None:
        return 0
    row = conn.execute("SELECT value FROM usage_meta WHERE name = 'schema'").fetchone()
    return 0 if row is None else int(row[0])


def _migrate(conn: sqlite3.Connection, where: str) -> None:
    """Bring the ``usage_`` tables to :data:`SCHEMA_VERSION`; read again under the lock,
    so two processes opening a new file at once apply each step exactly once."""
    if _version(conn) == SCHEMA_VERSION:
        return  # nothing to write: a read-only file still opens
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("CREATE TABLE IF NOT EXISTS usage_meta (name TEXT PRIMARY KEY, value INTEGER)")
        version = _version(conn)
        if version > SCHEMA_VERSION:
            raise ConfigurationError(
                f"the usage tables in {where} have schema version {version}, newer than "
                f"the {SCHEMA_VERSION} this keyguard knows; upgrade keyguard"
            )
        for step in _MIGRATIONS[version:]:
            for statement in step:
                conn.execute(statement)
        conn.execute("INSERT OR REPLACE INTO usage_meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _chunks(items: Sequence[str]) -> Iterator[Sequence[str]]:
    for at in range(0, len(items), _KEY_CHUNK):
        yield items[at : at + _KEY_CHUNK]


class SQLiteUsageStore:
    """A :class:`~keyguard.usage.store.UsageBackend` in a SQLite file.

    :param path: the database file; created if missing, but its directory must exist
        (a typo in a path must not start an empty database somewhere else).
    :param busy_timeout: milliseconds a write waits for another writer before
        :class:`StorageError`.

    **Security note**: rows and error entries hold key ids, owners, route templates
    and fixed messages, never a secret; the file is still operational data, so keep
    it as private as the key database.

    .. versionadded:: 0.1
    """

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout: int = 5000) -> None:
        if isinstance(busy_timeout, bool) or not isinstance(busy_timeout, int) or busy_timeout < 0:
            raise ConfigurationError("busy_timeout must be a whole number of milliseconds >= 0")
        if os.fspath(path) == ":memory:":
            raise ConfigurationError(
                "an in-memory SQLite usage store is per process; use memory://"
            )
        self._db = Connections(
            "usage store", timeout=busy_timeout / 1000, pragmas=("PRAGMA synchronous = NORMAL",)
        )
        file = Path(path).absolute()  # so a later chdir cannot switch files
        self._where = open_file(self._db, file, "usage", _migrate)

    @classmethod
    def from_url(cls, url: str, **options: Any) -> SQLiteUsageStore:
        """``sqlite:///relative.db`` or ``sqlite:////absolute/path.db``."""
        return cls(file_path(url), **options)

    def __repr__(self) -> str:
        return f"SQLiteUsageStore({self._where})"

    # sync face

    def write(self, batch: UsageBatch) -> None:
        """Add the rows and append the errors, all in one transaction."""
        if not batch.rows and not batch.errors:
            return
        keep = max(1, batch.error_log_size)
        with self._db.write("record usage") as conn:
            for row in batch.rows:
                where = (row.granularity.value, row.key_id, row.start, row.service)
                found = conn.execute(_SELECT_ROW, where).fetchone()
                counts = UsageCounts()
                if found is not None:
                    counts.merge(_counts(found[0]))
                counts.merge(row.counts)
                conn.execute(_UPSERT_ROW, (*where, row.owner, counts.to_json()))
            conn.executemany(
                "INSERT INTO usage_errors (key_id, data) VALUES (?, ?)",
                [(entry.key_id, entry.to_json()) for entry in batch.errors],
            )
            for key_id in {entry.key_id for entry in batch.errors}:
                conn.execute(_TRIM_ERRORS, (key_id, key_id, keep))

    def rows(self, query: RowQuery) -> Sequence[UsageRow]:
        """The matching rows, filtered in SQL."""
        clauses = ["granularity = ?", "start >= ?", "start < ?"]
        params: list[object] = [query.granularity.value, query.since, query.until]
        if query.owner is not None:
            clauses.append("owner = ?")
            params.append(query.owner)
        if query.service is not None:
            clauses.append("service = ?")
            params.append(query.service)
        # Only constant fragments are joined; every value is a bound parameter.
        sql = f"{_SELECT_COLUMNS} WHERE {' AND '.join(clauses)}"
        if query.key_ids is None:
            return self._select(sql, params)
        keys = sorted(set(query.key_ids))
        found: list[UsageRow] = []
        for chunk in _chunks(keys):
            marks = ", ".join("?" * len(chunk))
            found += self._select(f"{sql} AND key_id IN ({marks})", [*params, *chunk])
        return found

    def _select(self, sql: str, params: Sequence[object]) -> list[UsageRow]:
        with self._db.use() as conn, _storage_errors("read usage"):
            found = conn.execute(sql, params).fetchall()
        return [
            UsageRow(Granularity(g), int(start), key_id, service, owner, _counts(counts))
            for g, start, key_id, service, owner, counts in found
        ]

    def errors(self, key_id: str, limit: int = 100) -> Sequence[ErrorEntry]:
        if limit < 1:
            return []
        with self._db.use() as conn, _storage_errors("read the error log"):
            found = conn.execute(
                "SELECT data FROM usage_errors WHERE key_id = ? ORDER BY seq DESC LIMIT ?",
                (key_id, limit),
            ).fetchall()
        return [_entry(text) for (text,) in found]

    def prune(self, before: Mapping[Granularity, int]) -> None:
        with self._db.write("prune usage") as conn:
            conn.executemany(
                "DELETE FROM usage_rows WHERE granularity = ? AND start < ?",
                [(Granularity(g).value, int(bound)) for g, bound in before.items()],
            )

    def close(self) -> None:
        """Close every thread's connection; later calls raise :class:`StorageError`."""
        self._db.close()

    # async face: each call runs in a worker thread, which has its own connection

    async def awrite(self, batch: UsageBatch) -> None:
        await asyncio.to_thread(self.write, batch)

    async def arows(self, query: RowQuery) -> Sequence[UsageRow]:
        return await asyncio.to_thread(self.rows, query)

    async def aerrors(self, key_id: str, limit: int = 100) -> Sequence[ErrorEntry]:
        return await asyncio.to_thread(self.errors, key_id, limit)

    async def aprune(self, before: Mapping[Granularity, int]) -> None:
        await asyncio.to_thread(self.prune, before)

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)
