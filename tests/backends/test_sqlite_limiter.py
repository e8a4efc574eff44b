"""The SQLite rate store: exact across processes, durable quotas, faults as StorageError."""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
import os
import shutil
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keyguard.backends.sqlite import SQLiteKeyStore
from keyguard.backends.sqlite_limiter import SCHEMA_VERSION, SQLiteRateStore, dumps, loads
from keyguard.errors import ConfigurationError, StorageError
from keyguard.limiting import HitRequest, LimitPolicy, Quota, QuotaPeriod, Window
from keyguard.testing import FakeClock
from keyguard.windows import Bucket, Now, decide

START = datetime(2027, 1, 15, 12, tzinfo=UTC)
PROCESSES, THREADS = 4, 50
EVERYTHING = LimitPolicy(
    windows=(Window("second", 5, 1), Window("minute", 20, 60)),
    quotas=(Quota("daily", 100, QuotaPeriod.DAY),),
    concurrency=3,
)


@dataclass(frozen=True)
class FixedClock:
    """A clock stopped at one wall time, picklable so a child process can build it."""

    wall: float

    def now(self) -> float:
        return self.wall

    def monotonic(self) -> float:
        return 0.0


def rows(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        return int(conn.execute("SELECT count(*) FROM rl_buckets").fetchone()[0])


def used(store: SQLiteRateStore, bucket: str, policy: LimitPolicy) -> list[int]:
    return [s.limit - s.remaining for s in store.peek(bucket, policy)]


# -- many processes -----------------------------------------------------------------


def _worker(path: str, wall: float, policy: LimitPolicy, start: Any, out: Any) -> None:
    """One process: THREADS threads hit the same bucket at once; report admitted, errors."""
    store = SQLiteRateStore(path, clock=FixedClock(wall), busy_timeout=60_000)
    barrier = threading.Barrier(THREADS)
    admitted, errors = [], []

    def one() -> None:
        barrier.wait()
        try:
            admitted.append(store.hit(HitRequest("k", policy)).allowed)
        except StorageError as exc:
            errors.append(repr(exc.__cause__))

    threads = [threading.Thread(target=one) for _ in range(THREADS)]
    start.wait()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store.close()
    out.put((sum(admitted), errors))


@pytest.fixture
def importable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Put the repository on sys.path, which spawned children inherit, so they can
    import this module (pytest itself imports it without touching sys.path)."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2]))


def run_processes(path: Path, policy: LimitPolicy) -> tuple[int, list[str]]:
    """PROCESSES x THREADS simultaneous hits on one file at a fixed wall time."""
    SQLiteRateStore(path).close()  # create the file and WAL mode before the race
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Barrier(PROCESSES), ctx.Queue()
    wall = START.timestamp()
    procs = [
        ctx.Process(target=_worker, args=(str(path), wall, policy, start, out))
        for _ in range(PROCESSES)
    ]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    return sum(r[0] for r in results), [e for r in results for e in r[1]]


@pytest.mark.slow
@pytest.mark.usefixtures("importable")
def test_t68_exact_admission_under_concurrency(tmp_path: Path) -> None:
    """4 processes x 50 threads hit a 10/s window at one frozen instant: exactly 10 pass."""
    admitted, errors = run_processes(tmp_path / "rl.db", LimitPolicy(windows=(Window("s", 10, 1),)))
    assert errors == []
    assert admitted == 10


@pytest.mark.slow
@pytest.mark.usefixtures("importable")
def test_t92_sqlite_concurrent_writers(tmp_path: Path) -> None:
    """4 processes x 50 threads: no 'database is locked', every hit counted exactly once."""
    policy = LimitPolicy(
        windows=(Window("minute", 1000, 60),), quotas=(Quota("daily", 1000, QuotaPeriod.DAY),)
    )
    admitted, errors = run_processes(tmp_path / "rl.db", policy)
    assert errors == []
    assert admitted == PROCESSES * THREADS
    store = SQLiteRateStore(tmp_path / "rl.db", clock=FixedClock(START.timestamp()))
    assert used(store, "k", policy) == [200, 200]
    store.close()


# -- durability and time ------------------------------------------------------------


@pytest.fixture
def far_east(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A local time zone 14 hours ahead of UTC, so a local calendar would be visibly wrong."""
    monkeypatch.setenv("TZ", "Pacific/Kiritimati")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def hammer(store: SQLiteRateStore, policy: LimitPolicy, threads: int, each: int) -> int:
    admitted: list[bool] = []

    def one() -> None:
        admitted.extend(store.hit(HitRequest("k", policy)).allowed for _ in range(each))

    workers = [threading.Thread(target=one) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    return sum(admitted)


@pytest.mark.usefixtures("far_east")
def test_t75_quota_persistence(tmp_path: Path) -> None:
    """A month's usage survives a restart, 50 threads never overshoot, and the month
    turns over at 00:00 UTC (not local midnight)."""
    clock = FakeClock(datetime(2027, 1, 31, 23, 0, tzinfo=UTC))
    policy = LimitPolicy(quotas=(Quota("monthly", 1000, QuotaPeriod.MONTH),))
    first = SQLiteRateStore(tmp_path / "rl.db", clock=clock)
    assert hammer(first, policy, threads=50, each=12) == 600
    first.close()
    second = SQLiteRateStore(tmp_path / "rl.db", clock=clock)
    assert used(second, "k", policy) == [600]
    assert hammer(second, policy, threads=50, each=12) == 400
    assert used(second, "k", policy) == [1000]
    clock.advance(3599.999)
    refused = second.hit(HitRequest("k", policy))
    assert not refused.allowed
    assert refused.retry_after == pytest.approx(0.001)
    clock.advance(0.001)
    assert used(second, "k", policy) == [0]
    assert second.hit(HitRequest("k", policy)).allowed
    second.close()


def test_wall_clock_step_back_locks_out_one_window_at_most(tmp_path: Path) -> None:
    """Windows run on wall time here: a step back an hour keeps counts for one window only."""
    clock = FakeClock(START)
    store = SQLiteRateStore(tmp_path / "rl.db", clock=clock)
    policy = LimitPolicy(windows=(Window("minute", 2, 60),))
    for _ in range(2):
        assert store.hit(HitRequest("k", policy)).allowed
    clock.set_wall(clock.now() - 3600)
    assert not store.hit(HitRequest("k", policy)).allowed
    clock.advance(61)
    assert store.hit(HitRequest("k", policy)).allowed
    store.close()


def test_idle_rows_are_deleted_lazily(tmp_path: Path) -> None:
    """Rows of buckets gone idle disappear during later writes, a bounded batch at a time."""
    clock = FakeClock(START)
    store = SQLiteRateStore(tmp_path / "rl.db", clock=clock)
    policy = LimitPolicy(windows=(Window("minute", 5, 60),))
    for n in range(100):
        store.hit(HitRequest(f"k{n}", policy))
    assert rows(tmp_path / "rl.db") == 100
    clock.advance(120)
    live = LimitPolicy(windows=(Window("minute", 500, 60),))
    for _ in range(70):
        store.hit(HitRequest("live", live))
    assert rows(tmp_path / "rl.db") == 1
    store.reset("live")
    assert rows(tmp_path / "rl.db") == 0
    store.close()


# -- faults -------------------------------------------------------------------------


_BUCKET_WRITES = ("INSERT INTO rl_buckets", "UPDATE rl_buckets")


class Faulty(sqlite3.Connection):
    """A connection that fails the way a full or dying disk does, when told to."""

    fail_writes: ClassVar[bool] = False
    max_pages: ClassVar[int | None] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if Faulty.max_pages is not None:
            super().execute(f"PRAGMA max_page_count = {Faulty.max_pages}")

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if Faulty.fail_writes and sql.lstrip().startswith(_BUCKET_WRITES):
            raise sqlite3.OperationalError("disk I/O error")
        return super().execute(sql, *args)


@pytest.fixture
def faulty(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[Faulty]]:
    """Connections the store opens from now on are :class:`Faulty`."""
    real = sqlite3.connect
    monkeypatch.setattr(sqlite3, "connect", functools.partial(real, factory=Faulty))
    yield Faulty
    Faulty.fail_writes, Faulty.max_pages = False, None


def test_t93_failed_write_rolls_back_every_limit(tmp_path: Path, faulty: type[Faulty]) -> None:
    """A write failing mid-hit leaves no window, quota or slot partly charged."""
    store = SQLiteRateStore(tmp_path / "rl.db", clock=FakeClock(START))
    assert store.hit(HitRequest("k", EVERYTHING, cost=2, lease="a")).allowed
    faulty.fail_writes = True
    with pytest.raises(StorageError) as info:
        store.hit(HitRequest("k", EVERYTHING, cost=5, lease="b"))
    assert "k" not in str(info.value).split()
    assert isinstance(info.value.__cause__, sqlite3.Error)
    faulty.fail_writes = False
    assert used(store, "k", EVERYTHING) == [1, 1, 2, 1]
    assert store.hit(HitRequest("k", EVERYTHING, cost=5, lease="b")).allowed
    assert used(store, "k", EVERYTHING) == [2, 2, 7, 2]
    store.close()


def test_refusal_writes_nothing(tmp_path: Path, faulty: type[Faulty]) -> None:
    """A refused hit that finds nothing expired leaves the row alone: no write at all."""
    store = SQLiteRateStore(tmp_path / "rl.db", clock=FakeClock(START))
    policy = LimitPolicy(windows=(Window("minute", 1, 60),))
    assert store.hit(HitRequest("k", policy)).allowed
    faulty.fail_writes = True
    assert not store.hit(HitRequest("k", policy)).allowed  # would raise had it written
    with pytest.raises(StorageError):
        store.hit(HitRequest("other", policy))  # an admission must write
    faulty.fail_writes = False
    assert used(store, "k", policy) == [1]
    assert used(store, "other", policy) == [0]
    store.close()


def test_t93_disk_full(tmp_path: Path, faulty: type[Faulty]) -> None:
    """With no room left in the file, new buckets fail with StorageError and nothing else moves."""
    path = tmp_path / "rl.db"
    SQLiteRateStore(path, clock=FakeClock(START)).hit(HitRequest("k", EVERYTHING, lease="a"))
    with sqlite3.connect(path) as conn:
        faulty.max_pages = int(conn.execute("PRAGMA page_count").fetchone()[0]) + 4
    store = SQLiteRateStore(path, clock=FakeClock(START))
    tried: list[str] = []

    def fill() -> None:
        for n in range(50):
            tried.append(f"tenant-{'x' * 3000}-{n}")
            store.hit(HitRequest(tried[-1], EVERYTHING, lease="a"))

    with pytest.raises(StorageError) as info:
        fill()
    assert "tenant" not in str(info.value)
    assert len(tried) > 1
    assert used(store, tried[-1], EVERYTHING) == [0, 0, 0, 0]
    assert used(store, tried[0], EVERYTHING) == [1, 1, 1, 1]
    assert used(store, "k", EVERYTHING) == [1, 1, 1, 1]
    store.close()


def test_t93_busy_past_the_timeout(tmp_path: Path) -> None:
    """A writer holding the lock past busy_timeout gives StorageError, then all is well."""
    path = tmp_path / "rl.db"
    store = SQLiteRateStore(path, clock=FakeClock(START), busy_timeout=50)
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StorageError) as info:
            store.hit(HitRequest("k", EVERYTHING, lease="a"))
        assert "locked" in str(info.value.__cause__)
        assert used(store, "k", EVERYTHING) == [0, 0, 0, 0]  # readers never wait in WAL mode
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert store.hit(HitRequest("k", EVERYTHING, lease="a")).allowed
    store.close()


def test_t93_corrupt_file(tmp_path: Path) -> None:
    """A file that is not a database is a StorageError, never a bare sqlite3 error."""
    path = tmp_path / "rl.db"
    path.write_bytes(b"this is not a SQLite database\n" * 200)
    with pytest.raises(StorageError) as info:
        SQLiteRateStore(path)
    assert isinstance(info.value.__cause__, sqlite3.DatabaseError)


def test_t93_damaged_row(tmp_path: Path) -> None:
    """A row whose state is not ours is reported as damaged, not read as zero."""
    path = tmp_path / "rl.db"
    store = SQLiteRateStore(path, clock=FakeClock(START))
    store.hit(HitRequest("k", EVERYTHING, lease="a"))
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE rl_buckets SET state = '{\"w\": 1}'")
    with pytest.raises(StorageError, match="damaged"):
        store.hit(HitRequest("k", EVERYTHING, lease="b"))
    with pytest.raises(StorageError, match="damaged"):
        store.peek("k", EVERYTHING)
    store.close()


def read_only(path: Path) -> Iterator[bool]:
    """Make ``path`` unwritable even for root (``chattr +i``); yields False if impossible."""
    if os.geteuid() != 0:
        path.chmod(0o444)
        yield True
        path.chmod(0o644)
        return
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", str(path)], check=False).returncode:
        yield False
        return
    try:
        yield True
    finally:
        subprocess.run([chattr, "-i", str(path)], check=True)


def test_t93_read_only_file(tmp_path: Path) -> None:
    """A read-only database still reads, and every write is a StorageError."""
    path = tmp_path / "rl.db"
    store = SQLiteRateStore(path, clock=FakeClock(START))
    store.hit(HitRequest("k", EVERYTHING, lease="a"))
    store.close()
    with contextlib.contextmanager(read_only)(path) as possible:
        if not possible:
            pytest.skip("cannot make a file read-only here")
        again = SQLiteRateStore(path, clock=FakeClock(START))
        with pytest.raises(StorageError) as info:
            again.hit(HitRequest("k", EVERYTHING, lease="b"))
        assert isinstance(info.value.__cause__, sqlite3.Error)
        again.close()


# -- storage form ------------------------------------------------------------------


@given(history=st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 3)), max_size=30))
def test_dumps_loads_round_trip(history: list[tuple[int, int]]) -> None:
    """The JSON form gives back the same state."""
    policy = LimitPolicy(
        windows=(Window("second", 3, 1), Window("hour", 50, 3600, "svc:a")),
        quotas=(Quota("monthly", 30, QuotaPeriod.MONTH),),
        concurrency=3,
    )
    bucket, t = Bucket(), 0.0
    for n, (gap, units) in enumerate(history):
        t += gap / 1000
        decide(bucket, HitRequest("b", policy, units, f"l{n}"), Now(t, START.timestamp() + t))
    loaded = loads(dumps(bucket))
    assert loaded == bucket
    assert loaded.snapshot() == bucket.snapshot()
    assert not loaded.dirty
    assert all(c.total == sum(c.counts) for c in loaded.windows.values())


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[]",
        '{"w": {}, "q": {}}',
        '{"w": {"60:": [60000, 0, []]}, "q": {}, "l": {}}',
        '{"w": {"60:": [60000, 1000, [[1, "x"]]]}, "q": {}, "l": {}}',
        '{"w": {}, "q": {"year:": ["2027", 1]}, "l": {}}',
        '{"w": {}, "q": {"day:": ["2027-01", 1]}, "l": {}}',
        '{"w": {}, "q": {"month:": ["2027-13", 1]}, "l": {}}',
        '{"w": {"60:": [60000, 1000, [[2, 1], [1, 1]]]}, "q": {}, "l": {}}',
        '{"w": {"60:": [60000, 1000, [[1, 0]]]}, "q": {}, "l": {}}',
        '{"w": {}, "q": {}, "l": {"a": true}}',
    ],
)
def test_loads_refuses_damage(text: str) -> None:
    """A damaged stored state is a ValueError, never a wrong count."""
    with pytest.raises(ValueError, match=r"."):
        loads(text)


# -- schema, URLs, lifecycle --------------------------------------------------------


def test_shares_a_file_with_the_key_store(tmp_path: Path) -> None:
    """Key store and rate store live in one file; each keeps its own schema version."""
    path = tmp_path / "keyguard.db"
    keys = SQLiteKeyStore(path)
    rates = SQLiteRateStore(path, clock=FakeClock(START))
    assert rates.hit(HitRequest("k", EVERYTHING, lease="a")).allowed
    with sqlite3.connect(path) as conn:
        user_version = conn.execute("PRAGMA user_version").fetchone()[0]
        ours = conn.execute("SELECT value FROM rl_meta WHERE name = 'schema'").fetchone()[0]
    assert ours == SCHEMA_VERSION
    assert user_version >= 1
    keys.close()
    rates.close()
    SQLiteKeyStore(path).close()  # still opens: its version was left alone


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    """A file written by a newer keyguard is a ConfigurationError, not a guess."""
    path = tmp_path / "rl.db"
    SQLiteRateStore(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE rl_meta SET value = 99 WHERE name = 'schema'")
    with pytest.raises(ConfigurationError, match="99"):
        SQLiteRateStore(path)


def test_from_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Relative and absolute URLs open files; anything else is a ConfigurationError."""
    monkeypatch.chdir(tmp_path)
    SQLiteRateStore.from_url("sqlite:///rel.db").close()
    assert (tmp_path / "rel.db").exists()
    store = SQLiteRateStore.from_url(f"sqlite:///{tmp_path / 'abs.db'}")
    assert "abs.db" in repr(store)
    store.close()
    for bad in ("sqlite://", "sqlite:///", "memory://", "sqlite://:memory:"):
        with pytest.raises(ConfigurationError):
            SQLiteRateStore.from_url(bad)
    with pytest.raises(ConfigurationError):
        SQLiteRateStore(":memory:")
    with pytest.raises(ConfigurationError):
        SQLiteRateStore(tmp_path / "missing" / "rl.db")
    with pytest.raises(ConfigurationError):
        SQLiteRateStore(tmp_path / "x.db", busy_timeout=-1)


def test_closed_store_refuses(tmp_path: Path) -> None:
    """After close, calls raise StorageError instead of reopening behind the caller's back."""
    store = SQLiteRateStore(tmp_path / "rl.db")
    store.close()
    with pytest.raises(StorageError, match="closed"):
        store.hit(HitRequest("k", EVERYTHING, lease="a"))
