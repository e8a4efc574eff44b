"""The async check on stores whose async face is a worker thread: at most one hop per check,
none while the key is cached and its limits live in memory."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from keyguard import Allow, Guard, KeyGuardSettings, KeyManager, LimitOverrides, build_guard
from keyguard.backends.local_limiter import LocalWindowsRateStore
from keyguard.backends.memory import MemoryKeyStore
from keyguard.backends.memory_limiter import MemoryRateStore
from keyguard.backends.sqlite import SQLiteKeyStore
from keyguard.backends.sqlite_limiter import SQLiteRateStore
from keyguard.denials import Denial
from keyguard.keys import KeyHasher
from keyguard.limiting import Admission, HitRequest, LimitPolicy
from keyguard.manager import IssuedKey
from keyguard.records import KeyRecord
from keyguard.request import RequestInfo
from keyguard.testing import FakeClock


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


# -- the hybrid path: on the loop while the stores answer from memory -----------------


class CountingExecutor(ThreadPoolExecutor):
    """The loop's default executor, counting the work handed to its threads."""

    submitted = 0

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        self.submitted += 1
        return super().submit(fn, *args, **kwargs)


@pytest.fixture
async def executor() -> CountingExecutor:
    pool = CountingExecutor(2)
    asyncio.get_running_loop().set_default_executor(pool)  # the loop shuts it down
    return pool


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[Guard]:
    """The embedded default: a SQLite key file, windows in memory, quotas in the file."""
    settings = KeyGuardSettings(storage_url=f"sqlite:///{tmp_path / 'kg.db'}", usage_enabled=False)
    guard = build_guard(settings, clock=FakeClock())
    yield guard
    guard.backends.keys.close()
    if guard.backends.limiter is not None:
        guard.backends.limiter.close()


def request_with(issued: IssuedKey) -> RequestInfo:
    headers = ((b"x-api-key", issued.key.reveal().encode()),)
    return RequestInfo("GET", "/", headers, peer="203.0.113.7")


def slots_left(guard: Guard, issued: IssuedKey, cap: int) -> int:
    assert guard.backends.limiter is not None
    (slots,) = guard.backends.limiter.peek(issued.record.id, LimitPolicy(concurrency=cap))
    return slots.remaining


async def test_a_cached_key_without_quotas_is_checked_on_the_loop(
    embedded: Guard, executor: CountingExecutor
) -> None:
    """The first check looks the key up in a thread; later ones never leave the loop."""
    manager = KeyManager(embedded.backends.keys)
    limits = LimitOverrides(concurrency=5)
    issued = manager.create("k", plan="enterprise", limits=limits)  # a plan with no quota
    first = await embedded.acheck(request_with(issued))
    assert isinstance(first, Allow)
    assert executor.submitted == 1
    for _ in range(5):
        decision = await embedded.acheck(request_with(issued))
        assert isinstance(decision, Allow)
        assert decision.lease is not None
        await embedded.arelease(decision.lease)
    assert executor.submitted == 1
    assert first.lease is not None
    await embedded.arelease(first.lease)
    assert slots_left(embedded, issued, 5) == 5


async def test_a_revocation_elsewhere_stops_a_cached_key_on_the_next_check(
    embedded: Guard, tmp_path: Path
) -> None:
    issued = KeyManager(embedded.backends.keys).create("k")
    assert isinstance(await embedded.acheck(request_with(issued)), Allow)
    assert isinstance(await embedded.acheck(request_with(issued)), Allow)
    other = SQLiteKeyStore(tmp_path / "kg.db")
    KeyManager(other).revoke(issued.record.id)
    other.close()
    decision = await embedded.acheck(request_with(issued))
    assert isinstance(decision, Denial)
    assert decision.code == "invalid_api_key"


async def test_a_key_with_a_quota_is_charged_in_a_thread_and_exactly(
    embedded: Guard, executor: CountingExecutor
) -> None:
    issued = KeyManager(embedded.backends.keys).create("k", limits=LimitOverrides(quota_daily=3))
    decisions = [await embedded.acheck(request_with(issued)) for _ in range(4)]
    assert [type(d) for d in decisions] == [Allow, Allow, Allow, Denial]
    refusal = decisions[-1]
    assert isinstance(refusal, Denial)
    assert refusal.code == "quota_exceeded"
    assert executor.submitted == 4, "each quota charge is file I/O: one hop per check"
    keys = embedded.backends.keys
    assert isinstance(keys, SQLiteKeyStore)
    assert keys.find_cached(KeyHasher().digest(issued.key)) is not None, "quota writes keep it"


async def test_an_unknown_key_is_refused_after_a_lookup_in_a_thread(
    embedded: Guard, executor: CountingExecutor
) -> None:
    issued = KeyManager(SQLiteKeyStore(":memory:")).create("elsewhere")
    for _ in range(2):
        decision = await embedded.acheck(request_with(issued))
        assert isinstance(decision, Denial)
        assert decision.code == "invalid_api_key"
    assert executor.submitted == 2, "an unknown digest is never cached"


class GatedLookups(SQLiteKeyStore):
    """Holds every lookup at a gate (so no lookup is cached: see ``cache_size``)."""

    gate: threading.Event
    entered: threading.Event

    def find(self, digest: str) -> KeyRecord | None:
        self.entered.set()
        self.gate.wait(5)
        return super().find(digest)


async def test_t82_a_check_cancelled_in_its_thread_gives_its_slot_back(tmp_path: Path) -> None:
    """Cancelled while the lookup runs in the thread: the hit after it takes a slot
    nobody receives, and the guard releases it once the thread is done."""
    keys = GatedLookups(tmp_path / "kg.db")
    keys.gate, keys.entered = threading.Event(), threading.Event()
    limiter = LocalWindowsRateStore(MemoryRateStore(), SQLiteRateStore(tmp_path / "kg.db"))
    guard = Guard(keys=keys, limiter=limiter, telemetry=False)
    assert guard.threaded
    issued = KeyManager(keys).create("k", limits=LimitOverrides(concurrency=2))
    task = asyncio.ensure_future(guard.acheck(request_with(issued)))
    assert await asyncio.to_thread(keys.entered.wait, 5)
    task.cancel()
    await asyncio.sleep(0)
    keys.gate.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert slots_left(guard, issued, 2) == 2
    keys.close()
    limiter.close()
