"""The Redis usage store: exact sums across processes, its layout and TTLs, and faults.

The shared contract runs on Redis and a Redis Cluster too (``test_usagestore_contract.py``);
this module holds what only Redis has. Everything runs on throwaway servers
(``tests/redis_support.py``); fault tests get a server of their own to kill or pause.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.crc import key_slot

from keyguard.backends.redis_usage import RedisUsageStore
from keyguard.backends.registry import open_usage_store
from keyguard.errors import ConfigurationError, StorageError
from keyguard.usage.records import Granularity, RowQuery, UsageBatch
from tests.backends.test_usagestore_contract import T0, counts, entry, everything, row
from tests.redis_support import RedisCluster, RedisServer

pytestmark = pytest.mark.redis
PROCESSES, BATCHES = 4, 40
PATIENT: dict[str, Any] = {"socket_timeout": 10, "socket_connect_timeout": 10, "pool_timeout": 30}
DAY = 86_400


def new_prefix() -> str:
    return f"kgu-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def prefix() -> str:
    return new_prefix()


@pytest.fixture
def store(redis_server: RedisServer, prefix: str) -> Iterator[RedisUsageStore]:
    opened = RedisUsageStore.from_url(redis_server.url, prefix=prefix)
    yield opened
    opened.close()


@pytest.fixture
def admin(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    yield client
    client.close()


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
        error_log_size=10_000,
    )


# -- exact sums across processes ---------------------------------------------------


def _worker(url: str, key_prefix: str, first: int, start: Any, out: Any) -> None:
    """One process: BATCHES batches, one pipeline each, as fast as it can."""
    store = RedisUsageStore.from_url(url, prefix=key_prefix, **PATIENT)
    start.wait()
    for n in range(first, first + BATCHES):
        store.write(batch_of(n))
    store.close()
    out.put(BATCHES)


def run_processes(url: str, key_prefix: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Barrier(PROCESSES), ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(url, key_prefix, p * BATCHES, start, out))
        for p in range(PROCESSES)
    ]
    for p in procs:
        p.start()
    assert sum(out.get(timeout=120) for _ in procs) == PROCESSES * BATCHES
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0


def assert_summed(store: RedisUsageStore) -> None:
    total = PROCESSES * BATCHES
    found = {r.service: r.counts for r in store.rows(everything())}
    assert found["text:generate"].requests == total
    assert found["image:create"].statuses == {"2xx": total, "5xx": total}
    assert sum(found["image:create"].latency.values()) == 2 * total
    assert found["image:create"].latency_sum == pytest.approx(0.5 * total)
    (hour,) = store.rows(everything(Granularity.HOUR))
    assert (hour.counts.denied, hour.counts.reasons) == (total, {"rate": total})
    ids = sorted(e.request_id for e in store.errors("key_1", limit=10_000))
    assert ids == sorted(f"req-{n}" for n in range(total))


@pytest.mark.slow
@pytest.mark.usefixtures("importable")
@pytest.mark.parametrize("deployment", ["redis_server", "redis_cluster"])
def test_processes_writing_one_server_sum_exactly(
    deployment: str, request: pytest.FixtureRequest
) -> None:
    """Four processes write 40 batches each to the same rows at once, on one server and
    on a Cluster: every count lands exactly once, and every error entry is kept."""
    target: RedisServer | RedisCluster = request.getfixturevalue(deployment)
    key_prefix = new_prefix()
    run_processes(target.url, key_prefix)
    store = RedisUsageStore.from_url(target.url, prefix=key_prefix, **PATIENT)
    try:
        assert_summed(store)
    finally:
        store.close()


async def test_concurrent_async_writes_sum_exactly(redis_server: RedisServer) -> None:
    """A hundred awrite calls gathered on one loop add up exactly."""
    store = RedisUsageStore.from_url(redis_server.url, prefix=new_prefix(), **PATIENT)
    await asyncio.gather(*(store.awrite(UsageBatch((row(T0),))) for _ in range(100)))
    (back,) = await store.arows(everything())
    assert back.counts.requests == 100
    await store.aclose()


@pytest.mark.parametrize("deployment", ["redis_server", "redis_cluster"])
def test_a_flushed_script_cache_costs_nothing_but_an_eval(
    deployment: str, request: pytest.FixtureRequest
) -> None:
    """After SCRIPT FLUSH (as after a restart) a write falls back to EVAL and still adds
    every row exactly once."""
    target: RedisServer | RedisCluster = request.getfixturevalue(deployment)
    ports = [n.port for n in target.nodes] if isinstance(target, RedisCluster) else [target.port]
    store = RedisUsageStore.from_url(target.url, prefix=new_prefix(), **PATIENT)
    try:
        rows = tuple(row(T0, key=f"key_{n}") for n in range(20))
        store.write(UsageBatch(rows))
        for port in ports:
            with redis.Redis(port=port) as node:
                node.script_flush()
        store.write(UsageBatch(rows))
        found = store.rows(everything())
        assert sorted(r.counts.requests for r in found) == [2] * 20
    finally:
        store.close()


# -- layout and retention ------------------------------------------------------------


def test_rows_indexes_and_logs_get_their_granularitys_ttl(
    redis_server: RedisServer, admin: redis.Redis, prefix: str
) -> None:
    """Every key written expires: rows by their granularity's retention, indexes a day
    later, error logs with the day retention, key-id sets after the longest."""
    store = RedisUsageStore.from_url(
        redis_server.url, prefix=prefix, minute_retention=3600, hour_retention=7 * DAY
    )
    try:
        store.write(
            UsageBatch(
                tuple(row(T0, granularity=g) for g in Granularity),
                (entry(1),),
            )
        )
    finally:
        store.close()
    tag = "{" + prefix + ":k:key_1}"
    expected = {
        f"{tag}:minute:{T0}:text%3Agenerate": 3600,
        f"{tag}:hour:{T0}:text%3Agenerate": 7 * DAY,
        f"{tag}:day:{T0}:text%3Agenerate": 400 * DAY,
        f"{tag}:i:minute": 3600 + DAY,
        f"{tag}:i:hour": 8 * DAY,
        f"{tag}:i:day": 401 * DAY,
        f"{tag}:errors": 400 * DAY,
        "{" + prefix + ":all}:keys": 401 * DAY,
        "{" + prefix + ":o:acme}:keys": 401 * DAY,
    }
    assert sorted(admin.keys(f"*{prefix}*")) == sorted(expected)
    for key, ttl in expected.items():
        assert ttl - 5 <= admin.ttl(key) <= ttl, key


def test_user_data_never_breaks_a_hash_tag(store: RedisUsageStore, admin: redis.Redis) -> None:
    """Braces, colons and percent signs in a key id or owner are percent-encoded, so each
    key's data has one hash tag of its own."""
    store.write(UsageBatch((row(T0, key="a}{b:c%", owner="{x}:y", service="s{1}"),)))
    names = [str(name) for name in admin.keys(f"*{store.prefix}*")]
    tag = "{" + store.prefix + ":k:a%7D%7Bb%3Ac%25}"
    assert sorted(names) == sorted(
        [
            f"{tag}:minute:{T0}:s%7B1%7D",
            f"{tag}:i:minute",
            "{" + store.prefix + ":all}:keys",
            "{" + store.prefix + ":o:%7Bx%7D%3Ay}:keys",
        ]
    )
    for name in names:
        assert name.count("{") == name.count("}") == 1


def test_a_keys_data_lives_in_one_cluster_slot_and_keys_spread(
    redis_cluster: RedisCluster,
) -> None:
    """On a Cluster every key of one API key shares a slot; different keys use many."""
    key_prefix = new_prefix()
    store = RedisUsageStore.from_url(redis_cluster.url, prefix=key_prefix, **PATIENT)
    try:
        store.write(
            UsageBatch(
                tuple(
                    row(T0, key=f"key_{n}", granularity=g) for n in range(30) for g in Granularity
                ),
                tuple(entry(n, key=f"key_{n}") for n in range(30)),
            )
        )
        slots: dict[str, set[int]] = {}
        for node in redis_cluster.nodes:
            client = redis.Redis(port=node.port, decode_responses=True)
            for name in client.scan_iter(match=f"*{key_prefix}:k:*"):
                key_id = name[name.index(":k:") + 3 : name.index("}")]
                slots.setdefault(key_id, set()).add(key_slot(name.encode()))
            client.close()
        assert len(slots) == 30
        assert all(len(s) == 1 for s in slots.values())
        assert len({s for found in slots.values() for s in found}) > 20
        assert len(store.rows(everything(Granularity.DAY))) == 30
    finally:
        store.close()


def test_writes_drop_index_members_past_the_retention(
    redis_server: RedisServer, admin: redis.Redis, prefix: str
) -> None:
    """A row written long after an older one trims the older one's index member (its
    row has expired by then), so indexes do not grow without bound."""
    store = RedisUsageStore.from_url(redis_server.url, prefix=prefix, minute_retention=3600)
    try:
        store.write(UsageBatch((row(T0),)))
        store.write(UsageBatch((row(T0 + 2 * 3600),)))
        index = "{" + prefix + ":k:key_1}:i:minute"
        assert admin.zrange(index, 0, -1) == [f"{T0 + 2 * 3600}:text%3Agenerate"]
    finally:
        store.close()


def test_an_expired_row_is_skipped_and_prune_cleans_its_index(
    store: RedisUsageStore, admin: redis.Redis
) -> None:
    """A row gone by expiry is not returned; prune removes index members below its bound."""
    store.prune({Granularity.MINUTE: T0})  # nothing to prune yet: no key ids
    store.write(UsageBatch((row(T0), row(T0 + 60))))
    tag = "{" + store.prefix + ":k:key_1}"
    admin.delete(f"{tag}:minute:{T0}:text%3Agenerate")  # as expiry would
    assert [r.start for r in store.rows(everything())] == [T0 + 60]
    store.prune({Granularity.MINUTE: T0 + 60})
    assert admin.zrange(f"{tag}:i:minute", 0, -1) == [f"{T0 + 60}:text%3Agenerate"]


def test_a_damaged_row_or_entry_is_a_storage_error(
    store: RedisUsageStore, admin: redis.Redis
) -> None:
    """Fields this store did not write, an unreadable error entry or index member, are
    reported, not returned half-read."""
    store.write(UsageBatch((row(T0),), (entry(1),)))
    tag = "{" + store.prefix + ":k:key_1}"
    admin.hset(f"{tag}:minute:{T0}:text%3Agenerate", "x", "1")
    with pytest.raises(StorageError, match="damaged"):
        store.rows(everything())
    admin.lpush(f"{tag}:errors", "not json")
    with pytest.raises(StorageError, match="damaged"):
        store.errors("key_1")
    admin.zadd(f"{tag}:i:minute", {"later:text%3Agenerate": T0})
    with pytest.raises(StorageError, match="damaged"):
        store.rows(RowQuery(Granularity.MINUTE, 0, 2**40, key_ids=("key_1",)))


def test_a_client_that_decodes_responses_reads_the_same(
    redis_server: RedisServer, prefix: str
) -> None:
    """``decode_responses=True`` (passed through to redis-py) changes nothing."""
    store = RedisUsageStore.from_url(redis_server.url, prefix=prefix, decode_responses=True)
    try:
        written = row(T0, key="ключ", c=counts(200, 429, reason="rate", latency=0.5))
        store.write(UsageBatch((written,), (entry(1, key="ключ"),)))
        assert store.rows(everything()) == [written]
        assert store.errors("ключ") == [entry(1, key="ключ")]
    finally:
        store.close()


# -- faults ------------------------------------------------------------------------


def fails_fast(call: Callable[[], object], within: float = 1.0) -> StorageError:
    start = time.monotonic()
    with pytest.raises(StorageError) as caught:
        call()
    assert time.monotonic() - start < within
    return caught.value


def test_redis_down_is_a_quick_storage_error_without_the_password(own_redis: RedisServer) -> None:
    """With Redis killed every call fails within a second, and no message names the URL's
    password; with Redis back the same store works again."""
    url = f"redis://:s3cret-pw@127.0.0.1:{own_redis.port}/0"
    store = RedisUsageStore.from_url(url, prefix=new_prefix())
    try:
        own_redis.kill()
        calls: list[Callable[[], object]] = [
            lambda: store.write(UsageBatch((row(T0),), (entry(1),))),
            lambda: store.rows(everything()),
            lambda: store.rows(RowQuery(Granularity.MINUTE, 0, 1, key_ids=("k",))),
            lambda: store.errors("key_1"),
            lambda: store.prune({Granularity.MINUTE: T0}),
        ]
        for call in calls:
            error = fails_fast(call)
            assert "s3cret" not in str(error)
            assert "127.0.0.1" not in str(error)
        own_redis.start()
        store.write(UsageBatch((row(T0),)))
        assert len(store.rows(everything())) == 1
    finally:
        store.close()


def test_a_hung_redis_costs_one_timeout(own_redis: RedisServer) -> None:
    """A server that accepts but never answers (SIGSTOP) fails a write within a second."""
    store = RedisUsageStore.from_url(own_redis.url, prefix=new_prefix())
    try:
        store.write(UsageBatch((row(T0),)))
        own_redis.pause()
        fails_fast(lambda: store.write(UsageBatch((row(T0),))))
        fails_fast(lambda: store.rows(everything()))
    finally:
        own_redis.resume()
        store.close()


async def test_the_async_face_fails_fast_too(own_redis: RedisServer) -> None:
    """The async face turns a dead server into a quick StorageError as well."""
    store = RedisUsageStore.from_url(own_redis.url, prefix=new_prefix())
    await store.awrite(UsageBatch((row(T0),)))
    own_redis.kill()
    for call in (
        lambda: store.awrite(UsageBatch((row(T0),))),
        lambda: store.arows(everything()),
        lambda: store.aerrors("key_1"),
        lambda: store.aprune({Granularity.MINUTE: T0}),
    ):
        start = time.monotonic()
        with pytest.raises(StorageError):
            await call()
        assert time.monotonic() - start < 1.0
    await store.aclose()


def test_a_closed_store_refuses_calls(redis_server: RedisServer) -> None:
    """After close() (or aclose()) every call is a StorageError, sync or async."""
    store = RedisUsageStore.from_url(redis_server.url, prefix=new_prefix())
    asyncio.run(store.arows(everything()))
    store.close()
    with pytest.raises(StorageError, match="closed"):
        store.write(UsageBatch((row(T0),)))
    with pytest.raises(StorageError, match="closed"):
        asyncio.run(store.arows(everything()))


# -- configuration -----------------------------------------------------------------


def test_urls_open_through_the_registry(
    redis_server: RedisServer, redis_cluster: RedisCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The four Redis schemes open a RedisUsageStore; bad options are ConfigurationErrors;
    an unreachable Cluster is a StorageError; a missing driver names the extra."""
    for url in (redis_server.url, redis_cluster.url):
        store = open_usage_store(url, prefix=new_prefix(), minute_retention=600)
        assert isinstance(store, RedisUsageStore)
        assert store.retention[Granularity.MINUTE] == 600
        store.write(UsageBatch((row(T0),)))
        assert len(store.rows(everything())) == 1
        store.close()
    for url in ("rediss://127.0.0.1:1/0", "redis+sentinel://127.0.0.1:1,[::1]/main?db=2"):
        store = open_usage_store(url)
        assert isinstance(store, RedisUsageStore)
        store.close()
    bad: list[tuple[str, dict[str, Any]]] = [
        ("redis+sentinel://127.0.0.1:26379", {}),
        ("redis://127.0.0.1", {"socket_timeout": 0}),
        ("redis://127.0.0.1", {"prefix": "{bad}"}),
        ("redis://127.0.0.1", {"prefix": ""}),
        ("redis://127.0.0.1", {"hour_retention": 0}),
        ("redis://127.0.0.1", {"day_retention": 1.5}),
    ]
    for url, options in bad:
        with pytest.raises(ConfigurationError):
            open_usage_store(url, **options)
    with pytest.raises(StorageError):  # a Cluster's sync client reads the slot map at once
        open_usage_store("redis+cluster://127.0.0.1:1")
    for name in [m for m in sys.modules if m.startswith("keyguard.backends.redis_usage")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.delitem(sys.modules, "keyguard.backends._redis_client", raising=False)
    monkeypatch.delitem(sys.modules, "keyguard.backends._redis_cache", raising=False)
    monkeypatch.setitem(sys.modules, "redis", None)
    with pytest.raises(ConfigurationError, match=r"keyguard\[redis\]"):
        open_usage_store(redis_server.url)


def test_settings_retention_reaches_the_redis_rows(
    redis_server: RedisServer, admin: redis.Redis
) -> None:
    """KEYGUARD_USAGE_RETENTION_* set how long Redis keeps rows, as SQLite prunes them."""
    from keyguard.settings import KeyGuardSettings

    settings = KeyGuardSettings(
        storage_url=redis_server.url,
        redis_prefix=new_prefix(),
        redis_timeout=10,
        usage_retention_minutes=timedelta(hours=3),
        usage_retention_hours=timedelta(days=10),
    )
    store = settings.open_usage_store()
    try:
        store.write(UsageBatch(tuple(row(T0, granularity=g) for g in Granularity)))
    finally:
        store.close()
    ttls = {
        g: admin.ttl(next(iter(admin.scan_iter(f"*{settings.redis_prefix}*:{g.value}:{T0}:*"))))
        for g in Granularity
    }
    assert 3 * 3600 - 5 <= ttls[Granularity.MINUTE] <= 3 * 3600
    assert 10 * DAY - 5 <= ttls[Granularity.HOUR] <= 10 * DAY
    assert 400 * DAY - 5 <= ttls[Granularity.DAY] <= 400 * DAY


def test_a_batch_sent_again_counts_once(store: RedisUsageStore) -> None:
    """A writer's batch that is sent again (its reply was lost after Redis applied it,
    or it failed part-way) adds each row and each error entry once; a later batch of
    the writer, or another writer's, adds as usual."""
    batch = UsageBatch((row(T0), row(T0 + 60)), (entry(1),), writer="w1", sequence=1)
    store.write(batch)
    store.write(batch)
    store.write(UsageBatch((row(T0),), (entry(2),), writer="w1", sequence=2))
    store.write(UsageBatch((row(T0),), (entry(3),), writer="w2", sequence=1))
    found = {r.start: r.counts.requests for r in store.rows(everything())}
    assert found == {T0: 3, T0 + 60: 1}
    assert [e.request_id for e in store.errors("key_1")] == ["req-3", "req-2", "req-1"]


def test_a_lost_reply_is_retried_without_double_counting(
    redis_server: RedisServer, prefix: str
) -> None:
    """The recorder sends a failed batch again, unchanged; Redis applied it the first
    time (only the reply was lost), so the retry must not add it twice."""
    from keyguard.usage.recorder import UsageRecorder
    from keyguard.usage.records import UsageEvent

    class LostReply(RedisUsageStore):
        lose = 1

        def write(self, batch: UsageBatch) -> None:
            super().write(batch)
            if self.lose:
                self.lose -= 1
                raise StorageError("the reply was lost")

    store = LostReply.from_url(redis_server.url, prefix=prefix, **PATIENT)
    recorder = UsageRecorder(store)
    try:
        for n in range(10):
            recorder.record(
                UsageEvent(T0 + n, "key_1", "acme", "svc", "GET", "/", 500, 0.01, 1, None,
                           None, f"r{n}")
            )  # fmt: skip
            if n == 4:
                recorder.flush()  # applied, but reported as failed: held for retry
        recorder.flush()
        (day,) = store.rows(RowQuery(Granularity.DAY, 0, 2**40))
        assert day.counts.requests == 10
        assert len(store.errors("key_1", 100)) == 10
    finally:
        recorder.close()
        store.close()
