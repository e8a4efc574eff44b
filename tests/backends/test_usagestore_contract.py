"""The one usage-store contract: every backend, through its sync face and its async face.

A new usage backend is done when this file passes against it (add it to
``open_usage_backend``).
"""

from __future__ import annotations

import asyncio
import itertools
import random
import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from keyguard.backends.memory_usage import MemoryUsageStore
from keyguard.backends.sqlite_usage import SQLiteUsageStore
from keyguard.usage.histogram import bucket_of
from keyguard.usage.records import (
    ErrorEntry,
    Granularity,
    RowQuery,
    UsageBatch,
    UsageCounts,
    UsageEvent,
    UsageRow,
)
from keyguard.usage.store import AsyncUsageStore, UsageBackend, UsageStore
from tests.redis_support import RedisCluster, RedisServer

MINUTE = Granularity.MINUTE
T0 = 1_798_761_600  # 2027-01-01T00:00:00Z
# Patient for a loaded test machine; the fault tests of test_redis_usage.py use the
# short defaults.
REDIS_TEST_OPTIONS: dict[str, Any] = {"socket_timeout": 10, "socket_connect_timeout": 10}


class AsyncFace:
    """The async face behind the sync interface, so each test is written once."""

    def __init__(self, store: AsyncUsageStore) -> None:
        self._store = store

    def write(self, batch: UsageBatch) -> None:
        asyncio.run(self._store.awrite(batch))

    def rows(self, query: RowQuery) -> Sequence[UsageRow]:
        return asyncio.run(self._store.arows(query))

    def errors(self, key_id: str, limit: int = 100) -> Sequence[ErrorEntry]:
        return asyncio.run(self._store.aerrors(key_id, limit))

    def prune(self, before: Mapping[Granularity, int]) -> None:
        asyncio.run(self._store.aprune(before))

    def close(self) -> None:
        asyncio.run(self._store.aclose())


def open_usage_backend(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> UsageBackend:
    if kind == "memory":
        return MemoryUsageStore()
    if kind == "sqlite":
        return SQLiteUsageStore(tmp_path / "usage.db")
    if kind in ("redis", "redis-cluster"):
        # only Redis rows need redis-py; each store gets a prefix of its own, not a flush
        from keyguard.backends.redis_usage import RedisUsageStore

        deployment: RedisServer | RedisCluster = request.getfixturevalue(
            "redis_server" if kind == "redis" else "redis_cluster"
        )
        return RedisUsageStore.from_url(
            deployment.url, prefix=f"kgu-test-{uuid.uuid4().hex[:12]}", **REDIS_TEST_OPTIONS
        )
    raise AssertionError(kind)  # pragma: no cover


@pytest.fixture(
    params=[
        "memory",
        "sqlite",
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("redis-cluster", marks=pytest.mark.redis),
    ]
)
def usage_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[UsageBackend]:
    store = open_usage_backend(request.param, request, tmp_path)
    yield store
    store.close()


@pytest.fixture(params=["sync", "async"])
def usage(request: pytest.FixtureRequest, usage_backend: UsageBackend) -> UsageStore:
    return usage_backend if request.param == "sync" else AsyncFace(usage_backend)


def counts(
    *statuses: int, reason: str | None = None, latency: float = 0.01, units: int = 1
) -> UsageCounts:
    total = UsageCounts()
    for status in statuses:
        event = UsageEvent(
            T0, "k", None, None, "GET", "/", status, latency, units, reason, None, "r"
        )
        total.add(event, bucket_of(latency))
    return total


def row(
    start: int,
    key: str = "key_1",
    service: str = "text:generate",
    *,
    owner: str | None = "acme",
    c: UsageCounts | None = None,
    granularity: Granularity = MINUTE,
) -> UsageRow:
    return UsageRow(granularity, start, key, service, owner, c if c is not None else counts(200))


def entry(n: int, key: str = "key_1") -> ErrorEntry:
    return ErrorEntry(
        T0 + n,
        key,
        "acme",
        "text:generate",
        "POST",
        "/v1/generate",
        429,
        "rate_limit_exceeded",
        "Rate limit exceeded.",
        f"req-{n}",
    )


def everything(granularity: Granularity = MINUTE) -> RowQuery:
    return RowQuery(granularity, 0, 2**40)


def test_write_then_read_returns_equal_counts(usage: UsageStore) -> None:
    """A written row reads back equal, field for field, histogram included."""
    written = row(T0, c=counts(200, 200, 503, 429, reason=None, latency=0.123, units=3))
    usage.write(UsageBatch((written,)))
    (back,) = usage.rows(everything())
    assert back == written


def test_writes_to_the_same_row_add_up_exactly(usage: UsageStore) -> None:
    """Two batches for one key, service and minute sum; other rows stay apart."""
    usage.write(UsageBatch((row(T0), row(T0, service="image:create"))))
    usage.write(UsageBatch((row(T0, c=counts(200, 404, latency=0.5)),)))
    found = {r.service: r.counts for r in usage.rows(everything())}
    assert found["text:generate"].requests == 3
    assert found["text:generate"].errors == 1
    assert found["text:generate"].statuses == {"2xx": 2, "4xx": 1}
    assert sum(found["text:generate"].latency.values()) == 3
    assert found["image:create"].requests == 1


def test_denials_keep_their_reasons(usage: UsageStore) -> None:
    usage.write(UsageBatch((row(T0, c=counts(429, 429, reason="rate_limit_exceeded")),)))
    usage.write(UsageBatch((row(T0, c=counts(403, reason="ip_not_allowed")),)))
    (back,) = usage.rows(everything())
    assert back.counts.denied == 3
    assert back.counts.reasons == {"rate_limit_exceeded": 2, "ip_not_allowed": 1}


def test_query_narrows_by_time_key_owner_service_and_granularity(usage: UsageStore) -> None:
    usage.write(
        UsageBatch(
            (
                row(T0),
                row(T0 + 60),
                row(T0 + 120, key="key_2", owner="globex"),
                row(T0 + 60, service="image:create"),
                row(T0, granularity=Granularity.HOUR),
            )
        )
    )
    assert len(usage.rows(RowQuery(MINUTE, T0, T0 + 60))) == 1  # until is exclusive
    assert len(usage.rows(RowQuery(MINUTE, T0 + 60, T0 + 180))) == 3
    assert {r.key_id for r in usage.rows(RowQuery(MINUTE, 0, 2**40, key_ids=("key_2",)))} == {
        "key_2"
    }
    assert usage.rows(RowQuery(MINUTE, 0, 2**40, key_ids=())) == []
    assert {r.owner for r in usage.rows(RowQuery(MINUTE, 0, 2**40, owner="acme"))} == {"acme"}
    assert len(usage.rows(RowQuery(MINUTE, 0, 2**40, service="image:create"))) == 1
    assert len(usage.rows(everything(Granularity.HOUR))) == 1
    assert usage.rows(everything(Granularity.DAY)) == []


def test_rows_without_an_owner_or_a_service(usage: UsageStore) -> None:
    usage.write(UsageBatch((row(T0, service="", owner=None),)))
    (back,) = usage.rows(everything())
    assert back.service == ""
    assert back.owner is None
    assert usage.rows(RowQuery(MINUTE, 0, 2**40, owner="acme")) == []


def test_error_log_is_newest_first_and_bounded(usage: UsageStore) -> None:
    """Each key keeps its newest ``error_log_size`` entries; other keys keep theirs."""
    usage.write(UsageBatch((), tuple(entry(n) for n in range(5)), error_log_size=3))
    usage.write(UsageBatch((), (entry(5), entry(0, key="key_2")), error_log_size=3))
    assert [e.request_id for e in usage.errors("key_1")] == ["req-5", "req-4", "req-3"]
    assert [e.request_id for e in usage.errors("key_1", limit=2)] == ["req-5", "req-4"]
    assert usage.errors("key_2") == [entry(0, key="key_2")]
    assert usage.errors("key_unknown") == []


def test_prune_drops_rows_older_than_each_granularity_bound(usage: UsageStore) -> None:
    usage.write(
        UsageBatch(
            (
                row(T0),
                row(T0 + 60),
                row(T0, granularity=Granularity.HOUR),
                row(T0, granularity=Granularity.DAY),
            )
        )
    )
    usage.prune({MINUTE: T0 + 60, Granularity.HOUR: T0 + 3600})
    assert [r.start for r in usage.rows(everything())] == [T0 + 60]
    assert usage.rows(everything(Granularity.HOUR)) == []
    assert len(usage.rows(everything(Granularity.DAY))) == 1


def test_an_empty_batch_changes_nothing(usage: UsageStore) -> None:
    usage.write(UsageBatch(()))
    assert usage.rows(everything()) == []


def test_stored_rows_are_not_shared_with_the_caller(usage: UsageStore) -> None:
    written = row(T0)
    usage.write(UsageBatch((written,)))
    written.counts.requests = 1000
    (back,) = usage.rows(everything())
    assert back.counts.requests == 1
    back.counts.requests = 2000
    assert usage.rows(everything())[0].counts.requests == 1


# -- volume, odd names and concurrency ----------------------------------------------


def random_counts(rng: random.Random, n: int) -> UsageCounts:
    total = UsageCounts()
    for _ in range(n):
        status = rng.choice((200, 201, 204, 400, 401, 403, 404, 429, 500, 503))
        reason = rng.choice((None, None, "rate_limit_exceeded", "quota_exceeded"))
        latency = rng.lognormvariate(-4, 1.5)
        event = UsageEvent(
            T0, "k", None, None, "GET", "/", status, latency, rng.randint(0, 5), reason, None, "r"
        )
        total.add(event, bucket_of(latency))
    return total


def assert_same(found: Sequence[UsageRow], expected: Sequence[UsageRow]) -> None:
    """Equal rows, in any order; latency sums within float rounding of each other."""

    def key(r: UsageRow) -> tuple[str, int, str, str]:
        return (r.granularity.value, r.start, r.key_id, r.service)

    assert sorted(map(key, found)) == sorted(map(key, expected))
    by_key = {key(r): r for r in expected}
    for got in found:
        want = by_key[key(got)]
        assert got.owner == want.owner
        assert got.counts.latency_sum == pytest.approx(want.counts.latency_sum, rel=1e-12)
        got.counts.latency_sum = want.counts.latency_sum
        assert got.counts == want.counts


def test_many_rows_sum_and_filter_like_the_reference(usage: UsageStore) -> None:
    """Three batches of 300 rows over 12 keys, 3 services and 3 granularities read back
    equal to memory's, under every filter."""
    rng = random.Random(7)
    reference = MemoryUsageStore()
    keys = [f"key_{n}" for n in range(12)]
    for _ in range(3):
        rows = tuple(
            row(
                T0 + rng.randrange(20) * g.seconds,
                key=key,
                service=rng.choice(("text:generate", "image:create", "")),
                owner=f"owner-{keys.index(key) % 3}",
                c=random_counts(rng, rng.randint(1, 4)),
                granularity=g,
            )
            for key in keys
            for g in Granularity
            for _ in range(rng.randint(5, 12))
        )
        usage.write(UsageBatch(rows))
        reference.write(UsageBatch(rows))
    queries = [
        everything(),
        everything(Granularity.HOUR),
        everything(Granularity.DAY),
        RowQuery(MINUTE, T0 + 300, T0 + 900),
        RowQuery(MINUTE, 0, 2**40, key_ids=("key_3", "key_3", "key_5", "key_unknown")),
        RowQuery(MINUTE, 0, 2**40, owner="owner-1"),
        RowQuery(MINUTE, 0, 2**40, service=""),
        RowQuery(Granularity.HOUR, T0, T0 + 10 * 3600, owner="owner-2", service="image:create"),
    ]
    for query in queries:
        assert_same(usage.rows(query), reference.rows(query))


def test_a_histogram_with_many_buckets_reads_back_exactly(usage: UsageStore) -> None:
    """A thousand latencies from a microsecond to a minute: every bucket and count kept."""
    rng = random.Random(11)
    written = row(T0, c=random_counts(rng, 1000))
    assert len(written.counts.latency) > 300
    usage.write(UsageBatch((written,)))
    usage.write(UsageBatch((written,)))
    (back,) = usage.rows(everything())
    assert back.counts.latency == {b: 2 * n for b, n in written.counts.latency.items()}
    assert back.counts.requests == 2000
    assert back.counts.latency_sum == pytest.approx(2 * written.counts.latency_sum, rel=1e-12)


ODD_KEYS = ("{key}", "key}", "{", "a:b", "a%3Ab", "a b", "ключ-🔑", "key_1")
ODD_OWNERS = ("Åcme GmbH", "{acme}", "acme:eu", "acme%3Aeu", "acme")


def test_odd_key_ids_owners_and_services_stay_apart(usage: UsageStore) -> None:
    """Braces, colons, percent signs and non-ASCII in ids, owners and services neither
    collide nor break a query."""
    rows = tuple(
        row(T0, key=key, owner=owner, service=service)
        for key, owner in zip(ODD_KEYS, itertools.cycle(ODD_OWNERS), strict=False)
        for service in ("text:generate", "text%3Agenerate", "{s}", "débit:ü")
    )
    usage.write(UsageBatch(rows))
    usage.write(UsageBatch((), tuple(entry(n, key=key) for n, key in enumerate(ODD_KEYS))))
    assert_same(usage.rows(everything()), rows)
    for key in ODD_KEYS:
        found = usage.rows(RowQuery(MINUTE, 0, 2**40, key_ids=(key,)))
        assert_same(found, [r for r in rows if r.key_id == key])
        assert [e.key_id for e in usage.errors(key)] == [key]
    for owner in ODD_OWNERS:
        found = usage.rows(RowQuery(MINUTE, 0, 2**40, owner=owner))
        assert_same(found, [r for r in rows if r.owner == owner])
    for service in ("text%3Agenerate", "débit:ü", "{s}"):
        found = usage.rows(RowQuery(MINUTE, 0, 2**40, service=service))
        assert_same(found, [r for r in rows if r.service == service])


def test_a_key_that_changes_owner_is_read_by_row_owner(usage: UsageStore) -> None:
    """A row keeps its last writer's owner; an owner reads only the rows written for it."""
    usage.write(UsageBatch((row(T0, owner="acme"), row(T0 + 60, owner="acme"))))
    usage.write(UsageBatch((row(T0 + 60, owner="globex"), row(T0 + 120, owner=None))))
    assert [r.start for r in usage.rows(RowQuery(MINUTE, 0, 2**40, owner="acme"))] == [T0]
    (moved,) = usage.rows(RowQuery(MINUTE, 0, 2**40, owner="globex"))
    assert (moved.start, moved.counts.requests) == (T0 + 60, 2)
    owners = {r.start: r.owner for r in usage.rows(everything())}
    assert owners == {T0: "acme", T0 + 60: "globex", T0 + 120: None}


def test_unknown_keys_empty_ranges_and_a_zero_limit_read_nothing(usage: UsageStore) -> None:
    usage.write(UsageBatch((row(T0),), (entry(1),)))
    assert usage.rows(RowQuery(MINUTE, 0, 2**40, key_ids=("nobody",))) == []
    assert usage.rows(RowQuery(MINUTE, 0, 2**40, owner="nobody")) == []
    assert usage.rows(RowQuery(MINUTE, T0 + 60, T0 + 60)) == []
    assert usage.errors("key_1", limit=0) == []


def test_prune_keeps_error_logs_and_an_empty_bound_prunes_nothing(usage: UsageStore) -> None:
    usage.write(UsageBatch((row(T0),), (entry(1),)))
    usage.prune({})
    assert len(usage.rows(everything())) == 1
    usage.prune({MINUTE: T0 + 60, Granularity.HOUR: T0 + 3600, Granularity.DAY: T0 + 86400})
    assert usage.rows(everything()) == []
    assert usage.errors("key_1") == [entry(1)]
    usage.write(UsageBatch((row(T0),)))  # a pruned row starts again from zero
    assert usage.rows(everything())[0].counts.requests == 1


def test_a_large_error_batch_keeps_only_the_newest(usage: UsageStore) -> None:
    usage.write(UsageBatch((), tuple(entry(n) for n in range(250)), error_log_size=100))
    found = usage.errors("key_1", limit=1000)
    assert [e.request_id for e in found] == [f"req-{n}" for n in range(249, 149, -1)]


def test_concurrent_writers_sum_exactly(usage: UsageStore) -> None:
    """Six threads write ten batches each to the same rows at once: nothing is lost."""
    barrier = threading.Barrier(6)
    failures: list[BaseException] = []

    def writer() -> None:
        try:
            barrier.wait()
            for _ in range(10):
                usage.write(
                    UsageBatch((row(T0), row(T0, service="image:create", c=counts(500, 200))))
                )
        except BaseException as exc:  # reported below, on the test's thread
            failures.append(exc)

    threads = [threading.Thread(target=writer) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert failures == []
    found = {r.service: r.counts for r in usage.rows(everything())}
    assert found["text:generate"].requests == 60
    assert found["image:create"].requests == 120
    assert found["image:create"].statuses == {"5xx": 60, "2xx": 60}
    assert found["image:create"].errors == 60
