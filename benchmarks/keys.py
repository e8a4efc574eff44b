"""Foundation: what authenticating one request costs before any limit is checked.

Two figures per request:

- the offline work on the presented key: ``KeyFormat.parse`` (length, prefix,
  environment, alphabet and the CRC32 checksum) and ``KeyHasher.digest`` (SHA-256);
  target < 5 µs together;
- the store lookup, ``find(digest)``, on the memory and SQLite stores holding 1,000
  and 1,000,000 keys (``--quick``: 1,000 and 100,000), for a stored digest (a hit)
  and an unknown one (a miss). Lookups must be flat in the number of keys; the
  harness calls "flat" a large-store cost within 1.5x of the small-store cost.

**Bulk-load shortcut.** Saving a million keys one ``SQLiteKeyStore.save``
transaction at a time takes far too long for a benchmark, and the store has no bulk
API. So the SQLite database is created by the real store (its migrations make the
schema), then filled through a separate ``sqlite3`` connection in one transaction
with ``executemany``, writing exactly the rows ``SQLiteKeyStore.save`` writes: the
``keys`` row (JSON of ``storage_dict``), one ``key_digests`` row per digest, and one
``audit`` row. :func:`_check_bulk_matches_save` proves this on a few records before
every build by comparing the tables the two paths produce. The lookups themselves
run through the real store. The filled database is cached under
``benchmarks/.cache/`` keyed by schema version and key count, so reruns are fast.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import random
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from itertools import cycle, islice
from pathlib import Path

from keyguard.backends.memory import MemoryKeyStore
from keyguard.backends.protocols import KeyStore
from keyguard.backends.sqlite import SCHEMA_VERSION, SQLiteKeyStore
from keyguard.codec import audit_to_dict, storage_dict
from keyguard.keys import KeyFormat, KeyHasher, Secret, checksum
from keyguard.lifecycle import KeySpec, create_record
from keyguard.records import JSON, AuditEvent, KeyRecord, LimitOverrides

from ._harness import Settings, SuiteReport, measure

__all__ = ["CACHE_DIR", "run"]

SUITE = "keys"
CACHE_DIR = Path(__file__).resolve().parent / ".cache"
# Bump when the bulk loader writes different rows, so stale caches are rebuilt.
_BULK_FORMAT = 1
_HOT = 1000  # digests looked up round-robin for the flatness figure, at every size
_SPREAD = 65_536  # digests looked up round-robin for the "spread" figure
_FLAT = 1.5  # "flat": the large store's lookup within this factor of the small one's
_PARSE_TARGET_US = 5.0
_HINT = "kg_live_AbCd…wxyz"
_NOW = datetime(2025, 1, 1, tzinfo=UTC)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# The rows SQLiteKeyStore.save writes (keyguard/backends/sqlite.py: _UPSERT, the
# key_digests insert and _INSERT_AUDIT). Plain inserts suffice: the database is new.
_INSERT_KEY = (
    "INSERT INTO keys (id, owner, plan, revoked_at, expires_at, data) VALUES (?, ?, ?, ?, ?, ?)"
)
_INSERT_DIGEST = "INSERT INTO key_digests (digest, key_id) VALUES (?, ?)"
_INSERT_AUDIT = "INSERT INTO audit (key_id, at, data) VALUES (?, ?, ?)"


def _spec() -> KeySpec:
    return KeySpec(
        name="bench",
        owner="bench-team",
        scopes=("text:generate", "image:*"),
        limits=LimitOverrides(rate="60000/minute;1000000/hour;10000000/day"),
        ip_allow=("203.0.113.0/24",),
    ).validated()


def digest_for(i: int) -> str:
    """The stored digest of bulk key ``i``: 64 random-looking hex digits, reproducible."""
    return hashlib.sha256(b"keyguard-bench-%d" % i).hexdigest()


def _key_id(i: int) -> str:
    # The shape of keyguard's ids (``key_`` + 20 base62-ish characters), in order.
    return f"key_{i:020d}"


def bulk_records(n: int) -> Iterator[KeyRecord]:
    """``n`` records as ``create_record`` makes them, with random 64-hex digests."""
    spec = _spec()
    for i in range(n):
        yield create_record(spec, key_id=_key_id(i), digest=digest_for(i), hint=_HINT, now=_NOW)


def _event(record: KeyRecord) -> AuditEvent:
    details: dict[str, JSON] = {
        "name": record.name,
        "scopes": [*record.scopes],
        "plan": record.plan,
    }
    return AuditEvent(record.created_at, "bench", "create", record.id, details)


def _micros(moment: datetime | None) -> int | None:
    # As keyguard.backends.sqlite._micros: microseconds since the epoch.
    return None if moment is None else (moment - _EPOCH) // timedelta(microseconds=1)


def _rows(
    records: Sequence[KeyRecord],
) -> tuple[
    list[tuple[str, str | None, str, int | None, int | None, str]],
    list[tuple[str, str]],
    list[tuple[str, int | None, str]],
]:
    keys: list[tuple[str, str | None, str, int | None, int | None, str]] = []
    digests: list[tuple[str, str]] = []
    audit: list[tuple[str, int | None, str]] = []
    for record in records:
        keys.append(
            (
                record.id,
                record.owner,
                record.plan,
                _micros(record.revoked_at),
                _micros(record.expires_at),
                json.dumps(storage_dict(record), separators=(",", ":")),
            )
        )
        digests.extend((d.digest, record.id) for d in record.digests)
        event = _event(record)
        audit.append((event.key_id, _micros(event.at), json.dumps(audit_to_dict(event))))
    return keys, digests, audit


def _bulk_load(path: Path, records: Sequence[KeyRecord], *, batch: int = 100_000) -> None:
    """Create the schema with the real store, then insert every row in one transaction."""
    SQLiteKeyStore(path).close()
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA cache_size = -1000000")  # 1 GB: random index inserts stay cheap
        conn.execute("PRAGMA synchronous = OFF")  # a benchmark fixture: durability is moot
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("BEGIN IMMEDIATE")
        for start in range(0, len(records), batch):
            keys, digests, audit = _rows(records[start : start + batch])
            conn.executemany(_INSERT_KEY, keys)
            # Sorted, so the digest B-tree is appended to rather than split at random.
            conn.executemany(_INSERT_DIGEST, sorted(digests))
            conn.executemany(_INSERT_AUDIT, audit)
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


def _dump(path: Path) -> list[list[tuple[object, ...]]]:
    conn = sqlite3.connect(path)
    try:
        return [
            conn.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()
            for table in ("keys", "key_digests", "audit")
        ]
    finally:
        conn.close()


def _check_bulk_matches_save(work: Path) -> None:
    """The bulk loader must write what ``SQLiteKeyStore.save`` writes, row for row."""
    records = list(bulk_records(3))
    saved = work / "saved.db"
    store = SQLiteKeyStore(saved)
    try:
        for record in records:
            store.save(record, _event(record))
    finally:
        store.close()
    bulk = work / "bulk.db"
    _bulk_load(bulk, records)
    if _dump(saved) != _dump(bulk):
        raise RuntimeError("the bulk loader no longer writes what SQLiteKeyStore.save writes")


def sqlite_database(n: int, *, log: bool = True) -> Path:
    """The cached database of ``n`` bulk keys, built on first use."""
    CACHE_DIR.mkdir(exist_ok=True)
    path = CACHE_DIR / f"keys-schema{SCHEMA_VERSION}-bulk{_BULK_FORMAT}-{n}.db"
    if path.exists():
        return path
    with tempfile.TemporaryDirectory(dir=CACHE_DIR) as tmp:
        work = Path(tmp)
        _check_bulk_matches_save(work)
        if log:
            print(f"  building {path.name} (once; cached) ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        records = list(bulk_records(n))
        building = work / "building.db"
        _bulk_load(building, records)
        os.replace(building, path)
        if log:
            print(f"  built in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return path


def memory_store(n: int) -> MemoryKeyStore:
    """A memory store of ``n`` keys, filled through its public ``save``."""
    store = MemoryKeyStore(audit_size=16)
    for record in bulk_records(n):
        store.save(record, _event(record))
    return store


def _measure_lookups(
    report: SuiteReport, backend: str, n: int, store: KeyStore, settings: Settings
) -> float:
    """Hits on the same 1,000 keys at every size (the flatness figure), hits spread
    over up to 65,536 keys (memory-hierarchy effects), and misses."""
    rng = random.Random(n)
    # Random order: keys stored next to each other are not looked up one after another.
    hot = [digest_for(i) for i in rng.sample(range(n), min(n, _HOT))]
    spread = [digest_for(i) for i in rng.sample(range(n), min(n, _SPREAD))]
    _check_sample(store, hot)
    _check_sample(store, spread)
    misses = [hashlib.sha256(b"not-stored-%d" % i).hexdigest() for i in range(_HOT)]
    _check_sample(store, misses, stored=False)

    def find_loop(digests: list[str]) -> Callable[[int], None]:
        def loop(ops: int) -> None:
            find = store.find
            for digest in islice(cycle(digests), ops):
                find(digest)

        return loop

    label = f"{n:,} keys"
    hit = report.add(
        f"{backend} find, hit, {label}",
        measure(find_loop(hot), settings),
        f"round-robin over {len(hot):,} stored digests (same working set at every size)",
    )
    if len(spread) > len(hot):
        report.add(
            f"{backend} find, hit spread, {label}",
            measure(find_loop(spread), settings),
            f"round-robin over {len(spread):,} stored digests (caches miss more)",
        )
    report.add(
        f"{backend} find, miss, {label}",
        measure(find_loop(misses), settings),
        "unknown digests",
    )
    return hit.us


def _measure_plain_dict(report: SuiteReport, n: int, settings: Settings) -> float:
    """The control: one ``dict.get`` on a dict of ``n`` digests, same working set."""
    table = {digest_for(i): i for i in range(n)}
    hot = [digest_for(i) for i in random.Random(n).sample(range(n), min(n, _HOT))]

    def loop(ops: int) -> None:
        get = table.get
        for digest in islice(cycle(hot), ops):
            get(digest)

    return report.add(f"control: dict.get, hit, {n:,} keys", measure(loop, settings)).us


def _check_sample(store: KeyStore, digests: list[str], *, stored: bool = True) -> None:
    """Outside the timed loops: every hit must hit and every miss miss."""
    for digest in digests:
        if (store.find(digest) is not None) != stored:
            raise RuntimeError("a lookup sample does not behave as it should")


def _parse_and_digest(report: SuiteReport, settings: Settings) -> None:
    fmt = KeyFormat()
    hasher = KeyHasher()
    peppered = KeyHasher("a-server-side-pepper-of-32-bytes")
    keys = [fmt.generate().reveal() for _ in range(1024)]
    secrets = [Secret(k) for k in keys]
    bodies = [k[:-6] for k in keys]

    def parse(ops: int) -> None:
        p = fmt.parse
        for key in islice(cycle(keys), ops):
            p(key)

    def check(ops: int) -> None:
        for body in islice(cycle(bodies), ops):
            checksum(body)

    def digest(ops: int) -> None:
        d = hasher.digest
        for secret in islice(cycle(secrets), ops):
            d(secret)

    def hmac_digest(ops: int) -> None:
        d = peppered.digest
        for secret in islice(cycle(secrets), ops):
            d(secret)

    def both(ops: int) -> None:
        p, d = fmt.parse, hasher.digest
        for key in islice(cycle(keys), ops):
            d(p(key).secret)

    def empty(ops: int) -> None:
        for _key in islice(cycle(keys), ops):
            pass

    report.add("loop overhead (nothing)", measure(empty, settings), "included in every figure")
    report.add("checksum (CRC32 -> base62)", measure(check, settings), "part of parse")
    report.add("KeyFormat.parse", measure(parse, settings), "prefix, env, alphabet, checksum")
    report.add("KeyHasher.digest (SHA-256)", measure(digest, settings))
    report.add("KeyHasher.digest (HMAC, pepper)", measure(hmac_digest, settings), "information")
    total = report.add("parse + checksum + digest", measure(both, settings), "per request")
    report.derive(
        "parse + checksum + digest", total.us, "µs", target=_PARSE_TARGET_US, note="target < 5 µs"
    )


def run(settings: Settings) -> SuiteReport:
    report = SuiteReport(SUITE)
    _parse_and_digest(report, settings)
    small, large = (1_000, 100_000) if settings.quick else (1_000, 1_000_000)

    costs: dict[tuple[str, int], float] = {}
    for n in (small, large):
        costs["dict", n] = _measure_plain_dict(report, n, settings)
        gc.collect()
        store = memory_store(n)
        costs["memory", n] = _measure_lookups(report, "memory", n, store, settings)
        del store
        gc.collect()
    for n in (small, large):
        sqlite_store = SQLiteKeyStore(sqlite_database(n))
        try:
            costs["sqlite", n] = _measure_lookups(report, "sqlite", n, sqlite_store, settings)
        finally:
            sqlite_store.close()
    for backend, note in (
        ("dict", "control: a plain dict shows what the memory hierarchy alone adds"),
        ("memory", f"flat = within {_FLAT}x"),
        ("sqlite", f"flat = within {_FLAT}x"),
    ):
        report.derive(
            f"{backend} find growth, {large:,} vs {small:,} keys",
            costs[backend, large] / costs[backend, small],
            "x",
            target=None if backend == "dict" else _FLAT,
            note=note,
        )
    return report
