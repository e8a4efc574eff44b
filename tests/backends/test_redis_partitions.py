"""R3, network partitions and Sentinel failover, against real servers (SECURITY.md c.3).

A :class:`~tests.redis_support.PartitionProxy` sits between keyguard and a throwaway
redis-server and black-holes traffic (connections kept, bytes dropped, no RST) or drops
one direction; a Sentinel trio fails a master over while threads load one key. Every
store here runs on keyguard's *default* settings (``KeyGuardSettings``: 100 ms reply
and connect timeouts, breaker after 5 failures, 0.5 s recovery), because those are
what a partition meets in production.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import pytest
import redis
import redis.asyncio

from keyguard.backends._redis_client import KEEPALIVE, redis_clients
from keyguard.backends.redis import RedisKeyStore
from keyguard.backends.redis_limiter import RedisRateStore
from keyguard.configure import build_guard
from keyguard.decisions import Allow, Decision
from keyguard.denials import Denial
from keyguard.errors import StorageError
from keyguard.guard import Guard
from keyguard.limiting import HitRequest, LimitPolicy, Window
from keyguard.manager import KeyManager
from keyguard.request import RequestInfo
from keyguard.settings import KeyGuardSettings
from tests import redis_support
from tests.redis_support import (
    BLACKHOLE,
    DROP_DOWN,
    DROP_UP,
    FORWARD,
    PartitionProxy,
    RedisServer,
    SentinelGroup,
)

pytestmark = pytest.mark.redis
own_redis = redis_support.own_redis
partition = redis_support.partition
sentinel_group = redis_support.sentinel_group

DEFAULTS = KeyGuardSettings()
# One deadline: the most a single Redis call may cost, a connection then a reply.
DEADLINE = DEFAULTS.redis_connect_timeout + DEFAULTS.redis_timeout
SLACK = 0.3  # what a loaded 2-core machine may add to a bounded wait
RECOVERY = 0.5  # RedisRateStore's default recovery_time: the open breaker's probe interval
WIDE = LimitPolicy(windows=(Window("minute", 100_000, 60),))
_prefixes = itertools.count()


def options(url: str) -> dict[str, Any]:
    """What ``build_guard`` gives a Redis store: the default timeouts, a fresh prefix."""
    return {**DEFAULTS.backend_options(url), "prefix": f"r3t{next(_prefixes)}"}


def used(store: RedisRateStore, bucket: str, policy: LimitPolicy) -> int:
    return sum(s.limit - s.remaining for s in store.peek(bucket, policy))


class Faces:
    """A store's sync or async face, driven from a test thread (async: its own loop)."""

    def __init__(self, store: RedisRateStore, face: str) -> None:
        self.store, self.face = store, face
        self._runner = asyncio.Runner() if face == "async" else None

    def hit(self, request: HitRequest) -> bool:
        if self._runner is None:
            return self.store.hit(request).allowed
        return self._runner.run(self.store.ahit(request)).allowed

    def close(self) -> None:
        if self._runner is None:
            self.store.close()
        else:
            self._runner.run(self.store.aclose())
            self._runner.close()


def timed_failure(call: Callable[[], object]) -> float:
    """Seconds ``call`` took to raise StorageError (anything else fails the test)."""
    start = time.perf_counter()
    with pytest.raises(StorageError):
        call()
    return time.perf_counter() - start


def first_success(call: Callable[[], object], within: float) -> float:
    """Poll ``call`` (bounded) until it returns instead of raising StorageError."""
    start = time.monotonic()
    while time.monotonic() - start < within:
        try:
            call()
            return time.monotonic() - start
        except StorageError:
            time.sleep(0.01)
    raise AssertionError(f"no recovery within {within} s")


# -- black-hole and one-way partitions ------------------------------------------------


@pytest.mark.parametrize("face", ["sync", "async"])
def test_r3_blackhole_costs_one_deadline_then_the_breaker_fails_fast(
    partition: PartitionProxy, face: str
) -> None:
    """Black-holed (connections accepted, nothing answers, no RST): the first hits fail
    within one deadline each, never hang; the breaker then opens and, hammered for 2 s,
    keyguard opens at most one connection per probe interval; within a second of the
    partition healing hits are counted again, and nothing sent into the hole was
    charged."""
    store = RedisRateStore.from_url(partition.url, **options(partition.url))
    faces = Faces(store, face)
    request = HitRequest("k", WIDE)
    try:
        assert all(faces.hit(request) for _ in range(5))
        partition.set_mode(BLACKHOLE)
        waits = [timed_failure(lambda: faces.hit(request)) for _ in range(5)]
        assert max(waits) < DEADLINE + SLACK, waits
        assert "circuit=open" in repr(store)
        opened, calls, fast = time.monotonic(), 0, []
        while time.monotonic() - opened < 2.0:
            fast.append(timed_failure(lambda: faces.hit(request)))
            calls += 1
        touched = sum(t >= opened for t in partition.accepted)
        assert calls > 200  # hammered...
        assert touched <= 2.0 / RECOVERY + 1  # ...yet at most one probe per interval
        assert sorted(fast)[len(fast) // 2] < 0.005  # an open breaker costs no wait
        assert max(fast) < DEADLINE + SLACK  # a probe costs one deadline, no more
        partition.set_mode(FORWARD)
        assert first_success(lambda: faces.hit(request), within=2.0) < RECOVERY + DEADLINE + SLACK
        assert used(store, "k", WIDE) == 5 + 1  # the hole ran nothing
    finally:
        faces.close()


@pytest.mark.parametrize("direction", [DROP_UP, DROP_DOWN])
def test_r3_one_way_drop_costs_one_deadline_and_never_charges_twice(
    partition: PartitionProxy, direction: str
) -> None:
    """Requests lost (drop-up) or replies lost (drop-down): each hit fails within one
    deadline. A request whose reply was lost did run, and was charged exactly once:
    nothing is re-sent, so the count is the admitted hits plus at most one per failed
    hit, never more, and with drop-up exactly the admitted hits."""
    store = RedisRateStore.from_url(partition.url, **options(partition.url))
    request = HitRequest("k", WIDE)
    try:
        assert all(store.hit(request).allowed for _ in range(5))
        partition.set_mode(direction)
        waits = [timed_failure(lambda: store.hit(request)) for _ in range(8)]
        assert max(waits) < DEADLINE + SLACK, waits
        assert max(waits[5:]) < 0.005  # the breaker is open
        partition.set_mode(FORWARD)
        first_success(lambda: store.hit(request), within=RECOVERY + DEADLINE + SLACK + 0.5)
        counted = used(store, "k", WIDE)
        if direction == DROP_UP:
            assert counted == 5 + 1
        else:
            assert 5 + 1 <= counted <= 5 + 1 + 5  # at most once per hit that timed out
    finally:
        store.close()


def _request(key: str) -> RequestInfo:
    header = DEFAULTS.api_key_header.encode()
    return RequestInfo("GET", "/r3", headers=((header, key.encode()),), peer="127.0.0.1")


def _rate_headers(decision: Decision) -> list[bytes]:
    return [name for name, _ in decision.headers if b"ratelimit" in name.lower()]


def _close(guard: Guard) -> None:
    guard.backends.keys.close()
    if guard.backends.limiter is not None:
        guard.backends.limiter.close()
    if guard.usage is not None:
        guard.usage.close()


@pytest.mark.parametrize("policy", ["deny", "allow"])
def test_r3_guard_during_a_blackhole(
    partition: PartitionProxy, policy: Literal["deny", "allow"]
) -> None:
    """A guard built from settings, through a black-holed link: a cached key gets 503
    ``limiter_unavailable`` with Retry-After (deny) or is let through without limit
    headers (allow), each within one deadline; a key not in the cache gets 503
    ``key_store_unavailable`` (never 401); once the cache TTL has passed the cached key
    gets it too; within a second of the healing the key is admitted and limited again."""
    ttl = 2.0
    settings = KeyGuardSettings(
        storage_url=partition.url,
        on_limiter_error=policy,
        key_cache_ttl=ttl,
        redis_prefix=f"r3g{next(_prefixes)}",
    )
    guard = build_guard(settings)
    try:
        manager = KeyManager(guard.backends.keys)
        hot, cold = (manager.create(n).key.reveal() for n in ("hot", "cold"))

        def check(key: str) -> tuple[Decision, float]:
            start = time.perf_counter()
            decision = guard.check(_request(key))
            if isinstance(decision, Allow) and decision.lease is not None:
                guard.release(decision.lease)
            return decision, time.perf_counter() - start

        keys = guard.backends.keys
        assert isinstance(keys, RedisKeyStore)
        check(cold)  # starts the invalidation listener, which empties the cache once
        deadline = time.monotonic() + 5
        while not keys.listening:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        warm, _ = check(hot)
        cached_until = time.monotonic() + ttl
        assert isinstance(warm, Allow)
        assert _rate_headers(warm)
        partition.set_mode(BLACKHOLE)
        for _ in range(8):
            decision, took = check(hot)
            assert took < DEADLINE + SLACK
            if policy == "deny":
                assert isinstance(decision, Denial)
                assert (decision.status, decision.code) == (503, "limiter_unavailable")
                assert decision.retry_after is not None
                assert decision.retry_after >= 1
            else:
                assert isinstance(decision, Allow)
                assert not _rate_headers(decision)
        decision, took = check(cold)
        assert isinstance(decision, Denial)
        assert (decision.status, decision.code) == (503, "key_store_unavailable")
        assert took < DEADLINE + SLACK
        assert time.monotonic() < cached_until  # all of the above ran within the TTL
        time.sleep(max(0.0, cached_until - time.monotonic()) + 0.05)
        decision, took = check(hot)
        assert isinstance(decision, Denial)
        assert (decision.status, decision.code) == (503, "key_store_unavailable")
        assert took < DEADLINE + SLACK
        partition.set_mode(FORWARD)
        healed = time.monotonic()
        while True:
            decision, _ = check(hot)
            if isinstance(decision, Allow) and _rate_headers(decision):
                break
            assert time.monotonic() - healed < RECOVERY + DEADLINE + SLACK + 0.5
            time.sleep(0.01)
    finally:
        partition.set_mode(FORWARD)
        _close(guard)


async def test_r3_tcp_keepalive_is_on_every_connection(own_redis: RedisServer) -> None:
    """Both faces' connections carry SO_KEEPALIVE with keyguard's short timers, so a
    connection a partition killed is found while it sits idle in the pool."""
    assert KEEPALIVE  # Linux names all three timers
    sync, aio = redis_clients(own_redis.url)
    assert isinstance(sync, redis.Redis)
    assert isinstance(aio, redis.asyncio.Redis)
    try:
        sync.ping()
        await aio.ping()
        connection = sync.connection_pool.get_connection()
        try:
            assert_keepalive(connection._sock)
        finally:
            sync.connection_pool.release(connection)
        aconnection = await aio.connection_pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            assert aconnection._writer is not None
            assert_keepalive(aconnection._writer.get_extra_info("socket"))
        finally:
            await aio.connection_pool.release(aconnection)
    finally:
        sync.close()
        await aio.aclose()


def assert_keepalive(sock: Any) -> None:  # a socket, or asyncio's TransportSocket
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    for option, value in KEEPALIVE.items():
        assert sock.getsockopt(socket.IPPROTO_TCP, option) == value


# -- Sentinel -------------------------------------------------------------------------


def _connected_keepalive(store: RedisRateStore) -> None:
    client = store._client
    assert isinstance(client, redis.Redis)
    connection = client.connection_pool.get_connection()
    try:
        assert_keepalive(connection._sock)
    finally:
        client.connection_pool.release(connection)


class LoadLog:
    """What every call of a load did: when it started, its outcome, how long it took."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[tuple[float, str, float]] = []
        self.unexpected: list[BaseException] = []

    def record_sync(self, call: Callable[[], bool]) -> None:
        start = time.monotonic()
        try:
            outcome = "admitted" if call() else "refused"
        except StorageError:
            outcome = "error"
        except BaseException as exc:  # anything else escaping is the failure under test
            outcome = "unexpected"
            self.unexpected.append(exc)
        with self.lock:
            self.calls.append((start, outcome, time.monotonic() - start))

    async def record_async(self, call: Callable[[], Awaitable[bool]]) -> None:
        start = time.monotonic()
        try:
            outcome = "admitted" if await call() else "refused"
        except StorageError:
            outcome = "error"
        except Exception as exc:
            outcome = "unexpected"
            self.unexpected.append(exc)
        with self.lock:
            self.calls.append((start, outcome, time.monotonic() - start))

    def starts(self, *outcomes: str) -> list[float]:
        return sorted(start for start, outcome, _ in self.calls if outcome in outcomes)


def test_r3_sentinel_master_isolated_under_load(sentinel_group: SentinelGroup) -> None:
    """Five clients (three threads, two asyncio tasks) load one key limited to 50 per
    10 s through ``redis+sentinel://``; 1 s in, the master is isolated (SIGSTOP) and the
    sentinels promote the replica. Over two windows: nothing but StorageError escapes,
    no call outlives its timeouts, calls succeed again within a second of the promotion,
    the promoted replica still holds the first window's count (in any 10 s no more than
    the limit plus one increment per client, the most that can be in flight unreplicated
    when the master stops), and the second window admits on the new master."""
    window, limit, clients = 10, 50, 5
    group = sentinel_group
    url = group.url
    store = RedisRateStore.from_url(url, **options(url))
    request = HitRequest("k", LimitPolicy(windows=(Window("ten-seconds", limit, window),)))
    log, stop, sync_done = LoadLog(), threading.Event(), threading.Event()

    def sync_load() -> None:
        while not stop.is_set():
            log.record_sync(lambda: store.hit(request).allowed)
            time.sleep(0.01)

    async def one_task() -> None:
        async def call() -> bool:
            return (await store.ahit(request)).allowed

        while not stop.is_set():
            await log.record_async(call)
            await asyncio.sleep(0.01)

    async def async_load() -> None:
        await asyncio.gather(one_task(), one_task())
        await asyncio.to_thread(sync_done.wait, 10)
        await store.aclose()  # closes the sync client too, once its threads are done

    threads = [threading.Thread(target=sync_load) for _ in range(clients - 2)]
    runner = threading.Thread(target=asyncio.run, args=(async_load(),))
    started = time.monotonic()
    for thread in (*threads, runner):
        thread.start()
    try:
        time.sleep(1.0)
        _connected_keepalive(store)
        isolated = time.monotonic()
        group.master.pause()
        try:
            group.wait_for_master(group.replica.port)
            promoted = time.monotonic()
        finally:
            group.master.resume()  # back, stale: the sentinels demote it
        time.sleep(max(started + window + 1.5, promoted + 2.0) - time.monotonic())
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
        sync_done.set()
        runner.join(20)
    assert not [t for t in (*threads, runner) if t.is_alive()]

    assert not log.unexpected, log.unexpected
    worst = max(seconds for _, _, seconds in log.calls)
    # a call may ask the sentinels, connect to the master, then send the script twice
    # (NOSCRIPT on the promoted replica): every step under a 100 ms timeout
    assert worst < 2 * DEADLINE + SLACK, worst
    errors = log.starts("error")
    answered = log.starts("admitted", "refused")
    assert errors, "the isolation was never noticed"
    assert min(errors) >= isolated - 0.2
    # service resumes within a second of the promotion, and stays up
    assert max(errors) < promoted + 1.0, max(errors) - promoted
    assert any(t > promoted for t in answered)
    admitted = log.starts("admitted")
    slack = clients
    for t in admitted:  # any 9.5 s (timed here, not on the server) holds <= limit + slack
        assert sum(t - (window - 0.5) < u <= t for u in admitted) <= limit + slack
    first = [t for t in admitted if t < started + window - 0.5]
    assert limit <= len(first) <= limit + slack  # the count survived the failover
    assert 0 < len(admitted) - len(first) <= limit  # the second window, on the new master
    assert len(admitted) <= 2 * limit + slack


async def test_r3_sentinel_demoted_master_readonly_triggers_rediscovery(
    sentinel_group: SentinelGroup,
) -> None:
    """The master is demoted while keyguard holds pooled connections to it, without the
    client kill Sentinel would send (as another orchestrator or an operator's
    ``REPLICAOF`` does): the next hit on each face meets ``READONLY``, which redis-py's
    Sentinel pool turns into a connection error -- a StorageError here, one per face --
    and the hit after it asks the sentinels again and lands on the new master, whose
    count continued exactly (5 of 5 admitted, then refused)."""
    group = sentinel_group
    url = group.url
    store = RedisRateStore.from_url(url, **options(url))
    request = HitRequest("k", LimitPolicy(windows=(Window("minute", 5, 60),)))
    try:
        assert store.hit(request).allowed
        assert store.hit(request).allowed
        assert (await store.ahit(request)).allowed
        _connected_keepalive(store)
        old, new = group.master.port, group.replica.port
        group.ask(new, "replicaof", "no", "one")
        group.ask(old, "replicaof", "127.0.0.1", str(new))
        for sentinel in group.sentinels:
            group.ask(sentinel.port, "sentinel", "remove", redis_support.SENTINEL_SERVICE)
            group.ask(
                sentinel.port, "sentinel", "monitor", redis_support.SENTINEL_SERVICE,
                "127.0.0.1", str(new), "2",
            )  # fmt: skip
        group.wait_for_master(new)
        demoted = redis.Redis(port=old)
        try:
            deadline = time.monotonic() + 10
            while demoted.info("replication").get("master_link_status") != "up":
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            sync_errors: list[StorageError] = []
            async_errors: list[StorageError] = []
            outcomes: list[bool] = []
            for _ in range(4):
                try:
                    outcomes.append(store.hit(request).allowed)
                    break
                except StorageError as exc:
                    sync_errors.append(exc)
            for _ in range(4):
                try:
                    outcomes.append((await store.ahit(request)).allowed)
                    break
                except StorageError as exc:
                    async_errors.append(exc)
            readonly = demoted.info("errorstats").get("errorstat_READONLY", {})
        finally:
            demoted.close()
        assert outcomes == [True, True]
        assert len(sync_errors) == len(async_errors) == 1
        for error in (*sync_errors, *async_errors):
            assert isinstance(error.__cause__, redis.ConnectionError)
            assert "now a slave" in str(error.__cause__)
        assert readonly.get("count", 0) >= 2  # the old master did refuse both writes
        assert not store.hit(request).allowed
        assert not (await store.ahit(request)).allowed
        assert "circuit=closed" in repr(store)
    finally:
        await store.aclose()
