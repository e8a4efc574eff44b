"""Rate limits in a SQLite file: exact across the worker processes of one machine.

Every hit is one ``BEGIN IMMEDIATE`` transaction: read the bucket's row, run
:func:`keyguard.windows.decide` on it, write the row back if it changed. The write
lock is taken before the read, so two workers can never both admit the last request
of a window, and a failure rolls the whole hit back: a bucket's windows, quotas and
leases live in one row and change together or not at all. WAL mode lets ``peek``
read while a hit writes, and ``busy_timeout`` makes writers queue instead of failing.

Windows and leases run on the **wall** clock here, because worker processes share no
monotonic clock: a wall-clock step moves them too (a step back is folded into the
current slot, so it neither forgets requests nor locks out longer than one window).

Rows of idle buckets are deleted lazily, a bounded batch every few writes. Tables are
prefixed ``rl_`` so the file can be shared with :class:`~keyguard.backends.sqlite.SQLiteKeyStore`;
the schema version sits in ``rl_meta`` because ``PRAGMA user_version`` is the key
store's. ``synchronous=NORMAL`` (safe in WAL mode) keeps hits fast: a process crash
loses nothing, a power cut may lose the last few hits.

An async release does not wait for a write of its own (see :meth:`SQLiteRateStore.arelease`):
it rides on this store's next hit of the bucket, in the same transaction, or is written
with every other pending release ``release_delay`` seconds later.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import sqlite3
import threading
from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, ClassVar

from .._state import period_named
from ..clock import Clock, SystemClock
from ..errors import ConfigurationError, StorageError
from ..limiting import Adjustment, Admission, HitRequest, LimitPolicy, LimitState, QuotaPeriod
from ..windows import (
    DEFAULT_LEASE_TTL,
    DEFAULT_SLOTS,
    Bucket,
    Counter,
    Now,
    Tuning,
    Usage,
    adjust_quotas,
    decide,
    idle_at,
    inspect,
    release,
)
from ._sqlite import Connections, file_path, open_file, storage_errors

__all__ = ["DEFAULT_RELEASE_DELAY", "SCHEMA_VERSION", "SQLiteRateStore", "dumps", "loads"]

_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (  # 1: one row per bucket: its whole state, and when it goes idle
        """CREATE TABLE rl_buckets (
            bucket TEXT PRIMARY KEY,
            state TEXT NOT NULL,
            idle_at REAL NOT NULL
        ) WITHOUT ROWID""",
        "CREATE INDEX rl_buckets_by_idle ON rl_buckets (idle_at)",
    ),
)
SCHEMA_VERSION = len(_MIGRATIONS)
_UPSERT = """
    INSERT INTO rl_buckets (bucket, state, idle_at) VALUES (?, ?, ?)
    ON CONFLICT (bucket) DO UPDATE SET state = excluded.state, idle_at = excluded.idle_at
"""
_CLEAN = """
    DELETE FROM rl_buckets WHERE bucket IN
        (SELECT bucket FROM rl_buckets WHERE idle_at < ? ORDER BY idle_at LIMIT 64)
"""
_CLEAN_EVERY = 32  # writes between two clean-ups; each deletes at most 64 rows
_SELECT = "SELECT state, idle_at FROM rl_buckets WHERE bucket = ?"
_UPDATE = "UPDATE rl_buckets SET state = ? WHERE bucket = ?"
# idle_at is written this much later than the row goes idle, so most writes leave it
# (and its index) alone: an index entry rewritten on every hit doubled a hit's write
# cost. Deleting a row later than possible is harmless; earlier would forget counts.
_IDLE_SLACK = 16.0
DEFAULT_RELEASE_DELAY = 0.01  # seconds an async release may wait to ride on a hit
_MAX_RELEASED = 256  # pending releases of one bucket before they are written at once
_logger = logging.getLogger("keyguard")


# One encoder: json.dumps builds a new one on every call that passes an option.
_ENCODE = json.JSONEncoder(separators=(",", ":")).encode
_KINDS = {kind.value: kind for kind in QuotaPeriod}
_DAMAGED = "damaged rate-limit state"


def dumps(bucket: Bucket) -> str:
    """A bucket's state as compact JSON: the text of its row."""
    data = {
        "w": {
            k: [c.span, c.width, [[a, b] for a, b in zip(c.keys, c.counts, strict=True)]]
            for k, c in bucket.windows.items()
        },
        "q": {k: [u.period.key, u.used] for k, u in bucket.quotas.items()},
        "l": bucket.leases,
    }
    return _ENCODE(data)


def _whole(*values: object) -> bool:
    return all(type(v) is int for v in values)  # so not bool, nor float


def loads(text: str | bytes) -> Bucket:
    """The state :func:`dumps` wrote. :raises ValueError: if the text is damaged."""
    bucket = Bucket()
    try:
        data = json.loads(text)
        for k, (span, width, slots) in data["w"].items():
            keys, counts = [a for a, _ in slots], [n for _, n in slots]
            if not _whole(span, width, *keys, *counts) or min(span, width, *counts) < 1:
                raise ValueError(_DAMAGED)
            if any(a >= b for a, b in itertools.pairwise(keys)):
                raise ValueError(_DAMAGED)  # slots are stored oldest first
            if keys:  # a stored counter always holds a slot
                counter = bucket.windows[k] = Counter(span, width)
                counter.keys, counter.counts, counter.total = keys, counts, sum(counts)
        for k, (period, used) in data["q"].items():
            if not _whole(used):
                raise ValueError(_DAMAGED)
            bucket.quotas[k] = Usage(period_named(_KINDS[k[: k.index(":")]], period), used)
        bucket.leases = {str(k): v for k, v in data["l"].items()}
        if not _whole(*bucket.leases.values()):
            raise ValueError(_DAMAGED)
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(_DAMAGED) from exc
    bucket.lease_min = min(bucket.leases.values(), default=0)
    return bucket


def _storage_errors(action: str) -> AbstractContextManager[None]:
    return storage_errors("rate store", action)


def _version(conn: sqlite3.Connection) -> int:
    found = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'rl_meta'"
    ).fetchone()
    if found is None:
        return 0
    row = conn.execute("SELECT value FROM rl_meta WHERE name = 'schema'").fetchone()
    return 0 if row is None else int(row[0])


def _migrate(conn: sqlite3.Connection, where: str) -> None:
    """Bring the ``rl_`` tables to :data:`SCHEMA_VERSION`; read again under the lock."""
    if _version(conn) == SCHEMA_VERSION:
        return  # nothing to write: a read-only file still opens
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("CREATE TABLE IF NOT EXISTS rl_meta (name TEXT PRIMARY KEY, value INTEGER)")
        version = _version(conn)
        if version > SCHEMA_VERSION:
            raise ConfigurationError(
                f"the rate-limit tables in {where} have schema version {version}, newer than "
                f"the {SCHEMA_VERSION} this keyguard knows; upgrade keyguard"
            )
        for step in _MIGRATIONS[version:]:
            for statement in step:
                conn.execute(statement)
        conn.execute("INSERT OR REPLACE INTO rl_meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


class SQLiteRateStore:
    """A :class:`~keyguard.limiting.RateStore` and ``AsyncRateStore`` in a SQLite file.

    :param path: the database file; created if missing, but its directory must exist.
    :param clock: the time source; only its wall clock (``now()``) is read.
    :param busy_timeout: milliseconds a hit waits for another writer before
        :class:`StorageError`.
    :param lease_ttl: seconds a concurrency slot is held if never released (by a
        worker that crashed, say).
    :param slots: slots per window (precision against row size).
    :param release_delay: seconds an async release may wait to ride on the bucket's
        next hit from this store before it is written on its own (0 to 1).

    .. versionadded:: 0.1
    """

    # The async face is the sync one in a worker thread: a caller may run several
    # calls in one thread itself (see Guard.acheck).
    threaded: ClassVar[bool] = True
    # arelease only queues the release (see there): it never waits on I/O.
    queues_releases: ClassVar[bool] = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        clock: Clock | None = None,
        busy_timeout: int = 5000,
        lease_ttl: float = DEFAULT_LEASE_TTL,
        slots: int = DEFAULT_SLOTS,
        release_delay: float = DEFAULT_RELEASE_DELAY,
    ) -> None:
        if isinstance(busy_timeout, bool) or not isinstance(busy_timeout, int) or busy_timeout < 0:
            raise ConfigurationError("busy_timeout must be a whole number of milliseconds >= 0")
        if (
            isinstance(release_delay, bool)
            or not isinstance(release_delay, int | float)
            or not (0 <= release_delay <= 1)
        ):
            raise ConfigurationError("release_delay must be seconds in [0, 1]")
        self._release_delay = float(release_delay)
        # Releases waiting to be written, by bucket: filled on the event loop, taken by
        # hits in worker threads, hence the lock.
        self._pending: dict[str, list[str]] = {}
        self._pending_lock = threading.Lock()
        self._flush_timer: tuple[asyncio.AbstractEventLoop, asyncio.TimerHandle] | None = None
        self._flushes: set[asyncio.Future[None]] = set()
        if os.fspath(path) == ":memory:":
            raise ConfigurationError("an in-memory SQLite rate store is per process; use memory://")
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._tuning = Tuning(slots, lease_ttl)
        self._db = Connections(
            "rate store", timeout=busy_timeout / 1000, pragmas=("PRAGMA synchronous = NORMAL",)
        )
        self._writes = itertools.count(1)
        file = Path(path).absolute()  # so a later chdir cannot switch files
        self._where = open_file(self._db, file, "rate", _migrate)

    @classmethod
    def from_url(cls, url: str, **options: Any) -> SQLiteRateStore:
        """``sqlite:///relative.db`` or ``sqlite:////absolute/path.db``."""
        return cls(file_path(url), **options)

    def __repr__(self) -> str:
        return f"SQLiteRateStore({self._where})"

    @property
    def clock(self) -> Clock:
        """The time source the store reads, so a caller can place its periods in time."""
        return self._clock

    # time and rows

    def _now(self) -> Now:
        wall = self._clock.now()
        return Now(wall, wall)

    @staticmethod
    def _load(conn: sqlite3.Connection, bucket: str) -> tuple[Bucket, float | None]:
        """The bucket's state, and the ``idle_at`` its row holds (``None``: no row)."""
        row = conn.execute(_SELECT, (bucket,)).fetchone()
        if row is None:
            return Bucket(), None
        try:
            return loads(row[0]), row[1]
        except ValueError as exc:
            raise StorageError("a stored rate-limit state is damaged") from exc

    def _save(
        self, conn: sqlite3.Connection, bucket: str, state: Bucket, now: Now, stored: float | None
    ) -> None:
        if state.is_empty():
            conn.execute("DELETE FROM rl_buckets WHERE bucket = ?", (bucket,))
        else:
            idle = idle_at(state, now)
            if stored is not None and idle <= stored:  # the row goes idle no later
                conn.execute(_UPDATE, (dumps(state), bucket))
            else:
                conn.execute(_UPSERT, (bucket, dumps(state), idle + _IDLE_SLACK))
        if next(self._writes) % _CLEAN_EVERY == 0:
            conn.execute(_CLEAN, (now.tick,))

    # sync face

    def hit(self, request: HitRequest) -> Admission:
        if request.policy.is_empty():
            return Admission(True, ())
        released = self._take_pending(request.bucket) if self._pending else None
        try:
            with self._db.write("count a hit") as conn:
                now = self._now()  # read under the lock, so hits are stored in time order
                state, stored = self._load(conn, request.bucket)
                for lease in released or ():
                    release(state, lease)
                admission = decide(state, request, now, self._tuning)
                # A refusal charges nothing, but its pruning (at most once a slot) is
                # kept: it is what folds slots from before a clock step back into the
                # present.
                if state.dirty:
                    self._save(conn, request.bucket, state, now, stored)
        except BaseException:
            self._requeue(request.bucket, released)
            raise
        return admission

    def release(self, bucket: str, lease: str) -> None:
        with self._db.write("release a slot") as conn:
            state, stored = self._load(conn, bucket)
            if release(state, lease):
                self._save(conn, bucket, state, self._now(), stored)

    def adjust(self, adjustment: Adjustment) -> None:
        """Settle quota counters in one transaction (see :class:`~keyguard.limiting.Adjustment`)."""
        if not adjustment.delta or not adjustment.charges:
            return
        with self._db.write("adjust a quota") as conn:
            now = self._now()
            state, stored = self._load(conn, adjustment.bucket)
            adjust_quotas(state, adjustment, now)
            if state.dirty:
                self._save(conn, adjustment.bucket, state, now, stored)

    def peek(self, bucket: str, policy: LimitPolicy) -> Sequence[LimitState]:
        with self._db.use() as conn, _storage_errors("read a bucket"):
            state, _ = self._load(conn, bucket)
        if self._pending:  # slots given back but not yet written are free already
            with self._pending_lock:
                released = tuple(self._pending.get(bucket, ()))
            for lease in released:
                release(state, lease)
        return inspect(state, policy, self._now())

    def reset(self, bucket: str) -> None:
        with self._pending_lock:
            self._pending.pop(bucket, None)  # the slots go with the bucket
        with self._db.write("reset a bucket") as conn:
            conn.execute("DELETE FROM rl_buckets WHERE bucket = ?", (bucket,))

    def close(self) -> None:
        """Write pending releases, then close every thread's connection; later calls
        raise :class:`StorageError`."""
        try:
            self._flush()
        finally:
            self._db.close()

    # releases that ride on a later write

    def _take_pending(self, bucket: str) -> list[str] | None:
        with self._pending_lock:
            return self._pending.pop(bucket, None)

    def _requeue(self, bucket: str, released: list[str] | None) -> None:
        """Put back the releases a failed hit carried; the next hit or flush writes them
        (a release written twice is harmless: an unknown lease changes nothing)."""
        if released:
            with self._pending_lock:
                self._pending.setdefault(bucket, []).extend(released)

    def _flush(self) -> None:
        """Write every pending release, in one transaction."""
        with self._pending_lock:
            pending, self._pending = self._pending, {}
        if not pending:
            return
        try:
            with self._db.write("release slots") as conn:
                now = self._now()
                for bucket, leases in pending.items():
                    state, stored = self._load(conn, bucket)
                    for lease in leases:
                        release(state, lease)
                    if state.dirty:
                        self._save(conn, bucket, state, now, stored)
        except StorageError as exc:  # the type only: a message may name a bucket
            count = sum(len(leases) for leases in pending.values())
            _logger.warning(
                "keyguard could not release %d concurrency slots (%s); their leases expire",
                count,
                type(exc).__name__,
            )

    def _flush_soon(self) -> None:
        self._flush_timer = None
        if self._pending and not self._db.closed:
            flush = asyncio.ensure_future(asyncio.to_thread(self._flush))
            self._flushes.add(flush)
            flush.add_done_callback(self._flushes.discard)

    # async face: each call runs in a worker thread, which has its own connection

    async def ahit(self, request: HitRequest) -> Admission:
        return await asyncio.to_thread(self.hit, request)

    async def arelease(self, bucket: str, lease: str) -> None:
        """Give a slot back without waiting for a write: the release rides on this
        store's next hit of ``bucket`` (in its transaction), or is written with every
        other pending release ``release_delay`` seconds later, whichever comes first.

        So a response never waits for a write transaction and a worker thread to free
        its slot, and this process's next hit (and ``peek``) on the bucket always sees
        the slot free; another process sees it free up to ``release_delay`` later than
        it would otherwise. A release that cannot be written is logged, and the lease
        expiry gives the slot back (the crash backstop too); ``close()`` writes what
        is pending. Never suspends, so a cancellation cannot cut it short.
        """
        if self._db.closed:
            raise StorageError("the SQLite rate store is closed")
        with self._pending_lock:
            leases = self._pending.setdefault(bucket, [])
            leases.append(lease)
            full = len(leases) >= _MAX_RELEASED
        loop = asyncio.get_running_loop()
        timer = self._flush_timer
        if timer is None or timer[0] is not loop or full:
            if timer is not None:
                timer[1].cancel()
            delay = 0.0 if full else self._release_delay
            self._flush_timer = (loop, loop.call_later(delay, self._flush_soon))

    async def apeek(self, bucket: str, policy: LimitPolicy) -> Sequence[LimitState]:
        return await asyncio.to_thread(self.peek, bucket, policy)

    async def aadjust(self, adjustment: Adjustment) -> None:
        await asyncio.to_thread(self.adjust, adjustment)

    async def areset(self, bucket: str) -> None:
        await asyncio.to_thread(self.reset, bucket)

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)
