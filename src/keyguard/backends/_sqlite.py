"""Per-thread SQLite connections and write transactions, shared by the SQLite stores.

Each thread gets its own connection (SQLite connections are not to be shared across
threads, and never across ``fork()``: a child opens its own). Writes run in
``BEGIN IMMEDIATE`` transactions, because a deferred transaction that reads and then
writes fails at once with SQLITE_BUSY and ignores ``busy_timeout``.

The writers of one process queue on a lock per database file before they ask SQLite
for its write lock. SQLite's own busy handler waits by sleeping (1, 2, 5, 10 ... 100
ms between tries), so threads of one server that contend for the file through it
spend most of their time asleep while the lock is free: under load that alone cut a
server's admissions per second by four and put its p99 above 100 ms. The process lock
hands over at once; ``busy_timeout`` still bounds the wait for it, and SQLite's handler
is left to arbitrate between processes only.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from ..errors import ConfigurationError, StorageError

__all__ = ["Connections", "file_path", "open_file", "storage_errors"]

# One writer lock per (process, database): SQLite's lock is per file, so every store on
# a file (keys, limits, usage) queues on the same one. Keyed by pid too, so that a
# child forked while a parent thread held a lock starts with free ones.
_WRITERS: dict[tuple[int, str], threading.RLock] = {}
_WRITERS_LOCK = threading.Lock()


def _writer_lock(uri: str) -> threading.RLock:
    key = (os.getpid(), uri.partition("?")[0])
    with _WRITERS_LOCK:
        lock = _WRITERS.get(key)
        if lock is None:
            lock = _WRITERS[key] = threading.RLock()
        return lock


@contextmanager
def storage_errors(store: str, action: str) -> Iterator[None]:
    """Driver errors become :class:`StorageError`; the message names only the action."""
    try:
        yield
    except sqlite3.Error as exc:
        raise StorageError(f"the SQLite {store} could not {action}") from exc


class _Slot:
    """One thread's connection, closed when the thread (and so its local) goes away.

    ``lock`` is held while the connection runs a statement: :meth:`Connections.close`,
    called from another thread, takes it before closing, since closing a connection
    in the middle of another thread's statement crashes the process (sqlite3 frees
    what the statement is still using).
    """

    __slots__ = ("__weakref__", "conn", "lock", "pid")

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.pid = os.getpid()
        self.lock = threading.RLock()

    def __del__(self) -> None:
        self.conn.close()


class Connections:
    """The connections of one store.

    :param store: what the store is called in error messages ("key store").
    :param timeout: seconds a write waits for another writer (``busy_timeout``).
    :param pragmas: statements run on every new connection.
    """

    def __init__(self, store: str, *, timeout: float, pragmas: Sequence[str] = ()) -> None:
        self.store = store
        self._uri = ""
        self._writer: threading.RLock | None = None
        self._timeout = timeout
        self._pragmas = tuple(pragmas)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._slots: weakref.WeakSet[_Slot] = weakref.WeakSet()
        self._closed = False

    @property
    def uri(self) -> str:
        """The database every thread connects to; set by the store once it knows it."""
        return self._uri

    @uri.setter
    def uri(self, value: str) -> None:
        self._uri = value
        self._writer = _writer_lock(value)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def errors(self, action: str) -> AbstractContextManager[None]:
        """:func:`storage_errors` for this store."""
        return storage_errors(self.store, action)

    def connect(self, uri: str) -> sqlite3.Connection:
        """A new connection to ``uri`` with the store's pragmas."""
        with storage_errors(self.store, "open the database"):
            # check_same_thread=False only so close() may close every thread's
            # connection; each is still used by its own thread alone.
            conn = sqlite3.connect(
                uri, uri=True, timeout=self._timeout, isolation_level=None, check_same_thread=False
            )
            try:
                for pragma in self._pragmas:
                    conn.execute(pragma)
            except BaseException:
                conn.close()
                raise
        return conn

    def _slot(self) -> _Slot:
        """This thread's connection, opened on first use."""
        slot: _Slot | None = getattr(self._local, "slot", None)
        if slot is not None and slot.pid == os.getpid() and not self._closed:
            return slot
        with self._lock:  # so that close() cannot miss a connection being opened
            if self._closed:
                raise StorageError(f"the SQLite {self.store} is closed")
            slot = _Slot(self.connect(self.uri))
            self._slots.add(slot)
        self._local.slot = slot
        return slot

    @contextmanager
    def use(self) -> Iterator[sqlite3.Connection]:
        """This thread's connection, for the statements run inside the block: a
        :meth:`close` from another thread waits for them."""
        slot = self._slot()
        with slot.lock:
            yield slot.conn

    @contextmanager
    def write(self, action: str) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction: all of the body, or none of it.

        Taken after this process's other writers of the file (see the module), each
        wait bounded by ``busy_timeout``.
        """
        slot = self._slot()
        conn = slot.conn
        writer = self._writer
        if writer is None:  # pragma: no cover - every store sets its uri first
            raise StorageError(f"the SQLite {self.store} has no database")
        # RLock: a write inside another on the same file (the same thread) reaches
        # SQLite, which refuses it after busy_timeout as it always did, not a deadlock.
        if not writer.acquire(timeout=self._timeout):
            raise StorageError(f"the SQLite {self.store} could not {action}: busy")
        try:
            with slot.lock, storage_errors(self.store, action):
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
        finally:
            writer.release()

    def close(self) -> None:
        """Close every thread's connection; later use raises :class:`StorageError`.

        A connection in the middle of a statement is closed once the statement ends;
        one still busy after ``busy_timeout`` is left to its thread (closed when the
        thread goes away), never closed under it.
        """
        with self._lock:
            self._closed = True
            slots, self._slots = list(self._slots), weakref.WeakSet()
        with storage_errors(self.store, "close the database"):
            for slot in slots:
                if slot.lock.acquire(timeout=self._timeout):
                    try:
                        slot.conn.close()
                    finally:
                        slot.lock.release()


def file_path(url: str) -> str:
    """The path of a ``sqlite:///relative.db`` or ``sqlite:////absolute/path.db`` URL."""
    rest = url.removeprefix("sqlite://")
    if rest == url or not rest.startswith("/") or len(rest) == 1:
        raise ConfigurationError(
            "a SQLite URL reads sqlite:///relative/path.db or sqlite:////absolute/path.db"
        )
    return rest[1:]


def open_file(
    db: Connections, file: Path, what: str, migrate: Callable[[sqlite3.Connection, str], None]
) -> str:
    """Point ``db`` at ``file`` (which must stay where it is), in WAL mode, with its
    tables made or checked by ``migrate``; the file's name as error messages quote it.

    :raises ConfigurationError: the file's directory is missing (``what`` names the
        database in the message).
    """
    where = repr(str(file))
    if not file.parent.is_dir():
        raise ConfigurationError(f"the directory of the {what} database {where} is missing")
    db.uri = file.as_uri() + "?mode=rw"  # a file deleted under us is an error
    setup = db.connect(file.as_uri() + "?mode=rwc")
    try:
        with db.errors("open the database"):
            if str(setup.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
                setup.execute("PRAGMA journal_mode = WAL")
            migrate(setup, where)
    finally:
        setup.close()
    return where
