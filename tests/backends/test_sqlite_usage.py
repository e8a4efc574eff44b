"""The SQLite usage store: exact sums across processes, whole batches, and its file.

The shared contract runs on SQLite too (``test_usagestore_contract.py``); this module
holds what only SQLite has.
"""

from __future__ import annotations

import multiprocessing
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from keyguard.backends.memory_usage import MemoryUsageStore
from keyguard.backends.registry import open_usage_store
from keyguard.backends.sqlite import SQLiteKeyStore
from keyguard.backends.sqlite_limiter import SQLiteRateStore
from keyguard.backends.sqlite_usage import SCHEMA_VERSION, SQLiteUsageStore
from keyguard.errors import ConfigurationError, StorageError
from keyguard.usage.records import Granularity, RowQuery, UsageBatch, UsageRow
from keyguard.usage.store import UsageBackend
from tests.backends.test_usagestore_contract import T0, counts, entry, everything, row

PROCESSES, BATCHES = 4, 50


@pytest.fixture
def importable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Put the repository on sys.path, which spawned children inherit."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2]))


def batch_of(n: int) -> UsageBatch:
    """The same three rows every time, and one error entry numbered ``n``."""
    return UsageBatch(
        (
            row(T0),
            row(T0, service="image:create", c=counts(200, 503, latency=0.25)),
            row(T0 - T0 % 3600, granularity=Granularity.HOUR, c=counts(429, reason="rate")),
        ),
        (entry(n),),
        error_log_size=1000,
    )


def _worker(path: str, first: int, start: Any, out: Any) -> None:
    """One process: BATCHES batches, each in its own transaction, as fast as it can."""
    store = SQLiteUsageStore(path, busy_timeout=60_000)
    start.wait()
    for n in range(first, first + BATCHES):
        store.write(batch_of(n))
    store.close()
    out.put(BATCHES)


@pytest.mark.slow
@pytest.mark.usefixtures("importable")
def test_processes_writing_one_file_sum_exactly(tmp_path: Path) -> None:
    """Four processes write 50 batches each to the same rows at once: every count lands
    exactly once, and every error entry is kept."""
    path = tmp_path / "usage.db"
    SQLiteUsageStore(path).close()  # the file and its tables exist before the race
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Barrier(PROCESSES), ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(str(path), p * BATCHES, start, out))
        for p in range(PROCESSES)
    ]
    for p in procs:
        p.start()
    assert sum(out.get(timeout=120) for _ in procs) == PROCESSES * BATCHES
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    total = PROCESSES * BATCHES
    with closing(SQLiteUsageStore(path)) as store:
        found = {r.service: r.counts for r in store.rows(everything())}
        assert found["text:generate"].requests == total
        assert found["image:create"].statuses == {"2xx": total, "5xx": total}
        assert sum(found["image:create"].latency.values()) == 2 * total
        assert found["image:create"].latency_sum == pytest.approx(0.5 * total)
        (hour,) = store.rows(everything(Granularity.HOUR))
        assert (hour.counts.denied, hour.counts.reasons) == (total, {"rate": total})
        ids = sorted(e.request_id for e in store.errors("key_1", limit=10_000))
        assert ids == sorted(f"req-{n}" for n in range(total))


def test_a_batch_is_all_or_nothing(tmp_path: Path) -> None:
    """A batch that fails part-way (a damaged row) leaves nothing of itself behind."""
    path = tmp_path / "usage.db"
    with closing(SQLiteUsageStore(path)) as store:
        store.write(UsageBatch((row(T0 + 60),)))
        with closing(sqlite3.connect(path)) as conn, conn:
            conn.execute("UPDATE usage_rows SET counts = '{\"n\": 1}'")
        with pytest.raises(StorageError, match="damaged"):
            store.write(UsageBatch((row(T0), row(T0 + 60), row(T0 + 120)), (entry(1),)))
        with pytest.raises(StorageError, match="damaged"):
            store.rows(everything())
        assert store.rows(RowQuery(Granularity.MINUTE, T0, T0 + 60)) == []
        assert store.rows(RowQuery(Granularity.MINUTE, T0 + 120, T0 + 180)) == []
        assert store.errors("key_1") == []


def test_a_damaged_error_entry_is_a_storage_error(tmp_path: Path) -> None:
    """An unreadable stored entry is reported, not returned half-read."""
    path = tmp_path / "usage.db"
    with closing(SQLiteUsageStore(path)) as store:
        store.write(UsageBatch((), (entry(1),)))
        with closing(sqlite3.connect(path)) as conn, conn:
            conn.execute("UPDATE usage_errors SET data = 'nope'")
        with pytest.raises(StorageError, match="damaged"):
            store.errors("key_1")


def test_a_long_list_of_key_ids_is_read_in_chunks(tmp_path: Path) -> None:
    """Two thousand key ids, more than one statement may bind, in one query."""
    with closing(SQLiteUsageStore(tmp_path / "usage.db")) as store:
        rows = tuple(row(T0, key=f"key_{n}") for n in range(0, 2000, 7))
        store.write(UsageBatch(rows))
        wanted = tuple(f"key_{n}" for n in range(2000))
        found = store.rows(RowQuery(Granularity.MINUTE, 0, 2**40, key_ids=wanted))
        assert sorted(r.key_id for r in found) == sorted(r.key_id for r in rows)


def test_it_shares_a_file_with_the_key_and_rate_stores(tmp_path: Path) -> None:
    """Its tables are prefixed and versioned apart, so one file holds all three stores."""
    path = tmp_path / "keyguard.db"
    SQLiteKeyStore(path).close()
    SQLiteRateStore(path).close()
    with closing(SQLiteUsageStore(path)) as store:
        store.write(UsageBatch((row(T0),)))
    SQLiteKeyStore(path).close()
    with closing(SQLiteUsageStore(path)) as store:
        assert len(store.rows(everything())) == 1
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        meta = conn.execute("SELECT value FROM usage_meta WHERE name = 'schema'").fetchone()
        assert meta == (SCHEMA_VERSION,)


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    """A file written by a newer keyguard is refused, not misread."""
    path = tmp_path / "usage.db"
    SQLiteUsageStore(path).close()
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("UPDATE usage_meta SET value = 99 WHERE name = 'schema'")
    with pytest.raises(ConfigurationError, match="upgrade keyguard"):
        SQLiteUsageStore(path)


def test_a_closed_store_refuses_calls(tmp_path: Path) -> None:
    """After close() every call is a StorageError."""
    store = SQLiteUsageStore(tmp_path / "usage.db")
    store.close()
    with pytest.raises(StorageError, match="closed"):
        store.write(UsageBatch((row(T0),)))


async def test_the_async_face_runs_off_the_loop(tmp_path: Path) -> None:
    """The async face reads what the sync face wrote (each thread has its connection)."""
    store = SQLiteUsageStore(tmp_path / "usage.db")
    store.write(UsageBatch((row(T0),)))
    await store.awrite(UsageBatch((row(T0),), (entry(1),)))
    (back,) = await store.arows(everything())
    assert back.counts.requests == 2
    assert await store.aerrors("key_1") == [entry(1)]
    await store.aprune({Granularity.MINUTE: T0 + 60})
    assert await store.arows(everything()) == []
    await store.aclose()


def test_bad_paths_and_options_are_configuration_errors(tmp_path: Path) -> None:
    """A missing directory, :memory:, a bad timeout or a malformed URL is refused."""
    with pytest.raises(ConfigurationError, match="missing"):
        SQLiteUsageStore(tmp_path / "nowhere" / "usage.db")
    with pytest.raises(ConfigurationError, match="memory://"):
        SQLiteUsageStore(":memory:")
    with pytest.raises(ConfigurationError, match="busy_timeout"):
        SQLiteUsageStore(tmp_path / "usage.db", busy_timeout=-1)
    for url in ("sqlite://", "sqlite:///", "sqlite://host/usage.db", "memory://"):
        with pytest.raises(ConfigurationError, match="sqlite:///"):
            SQLiteUsageStore.from_url(url)


# -- the registry ------------------------------------------------------------------


def test_open_usage_store_opens_memory_and_sqlite_urls(tmp_path: Path) -> None:
    """The registry maps memory:// and sqlite:// to their stores, with both faces."""
    store = open_usage_store(f"sqlite:///{tmp_path / 'usage.db'}", busy_timeout=100)
    with closing(store):
        assert isinstance(store, SQLiteUsageStore)
        assert isinstance(store, UsageBackend)
        store.write(UsageBatch((UsageRow(Granularity.DAY, T0, "k", "", None, counts(200)),)))
    assert isinstance(open_usage_store("memory://"), MemoryUsageStore)
    with pytest.raises(ConfigurationError):
        open_usage_store("memory://somewhere")


def test_open_usage_store_refuses_unknown_schemes_naming_the_known_ones() -> None:
    """An unknown scheme or a non-URL is a ConfigurationError listing the known schemes."""
    with pytest.raises(ConfigurationError, match=r"unknown usage storage scheme") as info:
        open_usage_store("postgres://db/usage")
    for scheme in ("memory", "sqlite", "redis", "rediss", "redis+sentinel", "redis+cluster"):
        assert f"{scheme}://" in str(info.value)
    for bad in ("not a url", 42):
        with pytest.raises(ConfigurationError, match="not a URL"):
            open_usage_store(bad)  # type: ignore[arg-type]


def test_registered_factories_are_used_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    """register_usage_store adds a scheme; a factory returning something else is refused."""
    from keyguard.backends import registry

    monkeypatch.setitem(registry._USAGE_STORES, "odd", lambda url, **_: object())
    with pytest.raises(ConfigurationError, match="did not return a usage store"):
        open_usage_store("odd://")
    registry.register_usage_store("mem3", lambda url, **_: MemoryUsageStore())
    try:
        assert isinstance(open_usage_store("mem3://"), MemoryUsageStore)
    finally:
        del registry._USAGE_STORES["mem3"]
