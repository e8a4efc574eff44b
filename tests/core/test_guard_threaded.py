"""The async check on stores whose async face is a worker thread: one hop per check."""

from __future__ import annotations

import threading
from pathlib import Path

from keyguard import Allow, Guard, KeyManager, LimitOverrides
from keyguard.backends.memory import MemoryKeyStore
from keyguard.backends.memory_limiter import MemoryRateStore
from keyguard.backends.sqlite import SQLiteKeyStore
from keyguard.backends.sqlite_limiter import SQLiteRateStore
from keyguard.limiting import Admission, HitRequest, LimitPolicy
from keyguard.records import KeyRecord
from keyguard.request import RequestInfo


class ThreadsSeen(SQLiteKeyStore):
    """The SQLite key store, noting the thread of every lookup."""

    seen: list[int]

    def find(self, digest: str) -> KeyRecord | None:
        self.seen.append(threading.get_ident())
        return super().find(digest)


class HitsSeen(SQLiteRateStore):
    """The SQLite rate store, noting the thread of every hit."""

    seen: list[int]

    def hit(self, request: HitRequest) -> Admission:
        self.seen.append(threading.get_ident())
        return super().hit(request)


def test_only_stores_that_run_in_threads_or_in_process_make_a_threaded_guard(
    tmp_path: Path,
) -> None:
    """SQLite (alone or with memory limits) is threaded; memory is inline instead."""
    keys = SQLiteKeyStore(tmp_path / "kg.db")
    limits = SQLiteRateStore(tmp_path / "kg.db")
    assert Guard(keys=keys, limiter=limits).threaded
    assert Guard(keys=keys, limiter=limits).quick_release
    assert Guard(keys=keys, limiter=MemoryRateStore()).threaded
    memory = Guard(keys=MemoryKeyStore(), limiter=MemoryRateStore())
    assert memory.inline
    assert not memory.threaded
    keys.close()
    limits.close()


async def test_the_lookup_and_the_hit_run_in_one_worker_thread(tmp_path: Path) -> None:
    """One hop: the key lookup and the limiter hit share a thread, not the loop's."""
    keys = ThreadsSeen(tmp_path / "kg.db")
    limits = HitsSeen(tmp_path / "kg.db")
    keys.seen, limits.seen = [], []
    issued = KeyManager(keys).create("k", limits=LimitOverrides(concurrency=5))
    guard = Guard(keys=keys, limiter=limits, telemetry=False)
    headers = ((b"x-api-key", issued.key.reveal().encode()),)
    decision = await guard.acheck(RequestInfo("GET", "/", headers, peer="203.0.113.7"))
    assert isinstance(decision, Allow)
    assert decision.lease is not None
    assert len(keys.seen) == len(limits.seen) == 1
    assert keys.seen == limits.seen
    assert threading.get_ident() not in keys.seen
    await guard.arelease(decision.lease)
    (slots,) = limits.peek(issued.record.id, LimitPolicy(concurrency=5))
    assert slots.remaining == 5
    keys.close()
    limits.close()
