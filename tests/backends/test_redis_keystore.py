"""What only the Redis key store promises: its keyspace, its cache, pub/sub and faults.

The contract every key store meets runs in ``test_keystore_contract.py``; this file
covers SECURITY T17 and T24-T29 for Redis. Waits on real time (pub/sub delivery, a
second process) are bounded polls; everything about lifetimes uses a FakeClock.
"""

from __future__ import annotations

import asyncio
import gc
import multiprocessing
import secrets
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import timedelta
from typing import Any, Protocol

import pytest
import redis
from redis.crc import key_slot

from keyguard.backends import open_key_store
from keyguard.backends._redis_cache import RecordCache
from keyguard.backends.redis import RedisKeyStore
from keyguard.errors import ConfigurationError, InvalidCredential, StorageError
from keyguard.keys import BASE62, KeyFormat, Secret, checksum
from keyguard.lifecycle import KeyChanges
from keyguard.manager import AsyncKeyManager, KeyManager
from keyguard.records import AuditEvent, KeyQuery, KeyRecord, SecretDigest
from keyguard.testing import FakeClock
from tests.redis_support import RedisServer

pytestmark = pytest.mark.redis
THREAD = "keyguard-redis-invalidation"


class MakeStore(Protocol):
    def __call__(self, **options: Any) -> RedisKeyStore: ...


@pytest.fixture
def prefix() -> str:
    return f"kgtest-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def make_store(redis_server: RedisServer, prefix: str) -> Iterator[MakeStore]:
    """Opens stores on the session's server under this test's prefix; closes them after."""
    opened: list[RedisKeyStore] = []

    def make(**options: Any) -> RedisKeyStore:
        options.setdefault("prefix", prefix)
        store = RedisKeyStore.from_url(redis_server.url, **options)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


@pytest.fixture
def raw(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A plain client, to look at (and change) the keyspace behind the store's back."""
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll ``condition`` every 10 ms for at most ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def listening(store: RedisKeyStore) -> RedisKeyStore:
    """Start the store's listener and wait until it is subscribed."""
    store.find("0" * 64)
    assert wait_until(lambda: store.listening)
    return store


async def alistening(store: RedisKeyStore) -> RedisKeyStore:
    """Start this loop's listener task and wait until it is subscribed."""
    await store.afind("0" * 64)
    for _ in range(500):
        if store.listening:
            return store
        await asyncio.sleep(0.01)
    pytest.fail("the listener never subscribed")


def digest(manager: KeyManager | AsyncKeyManager, key: Secret) -> str:
    return manager.flows.hasher.digest(key)


def listener_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(THREAD)]


# T17 ------------------------------------------------------------------------------


def dump(client: redis.Redis, prefix: str) -> bytes:
    """Every key of the store, with its whole value, as one blob."""
    parts: list[object] = []
    for key in client.scan_iter(match="{" + prefix + "}*", count=1000):
        kind = client.type(key)
        parts.append(key)
        if kind == b"string":
            parts.append(client.get(key))
        elif kind == b"hash":
            parts.extend(client.hgetall(key).items())
        elif kind == b"list":
            parts.extend(client.lrange(key, 0, -1))
        elif kind == b"zset":
            parts.extend(client.zrange(key, 0, -1))
        else:
            pytest.fail(f"unexpected key type {kind!r}")
    return b"\n".join(as_bytes(p) for p in parts)


def as_bytes(value: object) -> bytes:
    if isinstance(value, tuple | list):
        return b"=".join(as_bytes(v) for v in value)
    return value if isinstance(value, bytes) else str(value).encode()


def canary_key(canary: str) -> Secret:
    """A well-formed key (good checksum, so it reaches the store) carrying ``canary``."""
    random = canary + "".join(secrets.choice(BASE62) for _ in range(32 - len(canary)))
    body = f"kg_live_{random}"
    return Secret(body + checksum(body))


def test_t17_keyspace_and_messages_hold_digests_only(
    make_store: MakeStore, raw: redis.Redis, prefix: str
) -> None:
    """The keyspace and the invalidation messages hold no key, key body or canary."""
    canary = "Canary" + uuid.uuid4().hex[:12]
    messages = raw.pubsub()  # type: ignore[no-untyped-call, unused-ignore]
    messages.subscribe("{" + prefix + "}:invalidate")
    store = make_store()
    manager = KeyManager(store)
    issued = [manager.create(f"name-{n}", owner="canary-owner") for n in range(4)]
    issued.append(manager.rotate(issued[0].record.id, grace=timedelta(hours=1)))
    manager.revoke(issued[1].record.id)
    for item in issued[2:]:
        manager.authenticate(item.key)
    with pytest.raises(InvalidCredential):
        manager.authenticate(canary_key(canary))
    keyspace = dump(raw, prefix)
    published = b""
    while (message := messages.get_message(timeout=0.2)) is not None:
        published += bytes(message["data"]) if isinstance(message["data"], bytes) else b""
    messages.close()
    assert b"name-3" in keyspace  # the records really are in what was read
    assert digest(manager, issued[2].key).encode() in keyspace
    assert digest(manager, issued[2].key).encode() in published
    for blob in (keyspace, published):
        assert canary.encode() not in blob
        for item in issued:
            secret = item.key.reveal()
            assert secret.encode() not in blob
            assert secret.split("_", 2)[2].encode() not in blob


# data layout -----------------------------------------------------------------------


def test_layout_grace_ttl_audit_cap_and_one_slot(
    make_store: MakeStore, raw: redis.Redis, prefix: str
) -> None:
    """An old secret's index ends with its grace, the audit list is capped, one slot."""
    clock = FakeClock()
    store = make_store(clock=clock, audit_size=3)
    manager = KeyManager(store, clock=clock)
    first = manager.create("svc")
    second = manager.rotate(first.record.id, grace=timedelta(minutes=10))
    old_key = "{" + prefix + "}:digest:" + digest(manager, first.key)
    new_key = "{" + prefix + "}:digest:" + digest(manager, second.key)
    assert 599_000 < raw.pttl(old_key) <= 600_000
    assert raw.pttl(new_key) == -1
    clock.advance(60)
    third = manager.rotate(first.record.id, grace=timedelta(0))
    third_key = "{" + prefix + "}:digest:" + digest(manager, third.key)
    assert raw.exists(new_key) == 0  # grace 0: the second secret is gone at once
    assert 539_000 < raw.pttl(old_key) <= 540_000  # the first keeps its own deadline
    assert raw.pttl(third_key) == -1
    assert store.find(digest(manager, second.key)) is None
    manager.update(first.record.id, KeyChanges(name="renamed"))
    assert raw.llen("{" + prefix + "}:audit") == 3
    assert [e.action for e in store.audit(first.record.id)] == ["update", "rotate", "rotate"]
    slots = {key_slot(k) for k in raw.scan_iter(match="{" + prefix + "}*")}
    assert len(slots) == 1


def test_find_is_one_round_trip(own_redis: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """An uncached lookup sends exactly one command (EVALSHA) to the server."""
    store = RedisKeyStore.from_url(own_redis.url, cache_ttl=0, negative_ttl=0)
    try:
        manager = KeyManager(store)
        issued = manager.create("svc")
        store.find("0" * 64)  # the script is loaded by now
        sent: list[object] = []
        real: Callable[..., None] = redis.connection.AbstractConnection.send_packed_command

        def counting(self: Any, command: Any, check_health: bool = True) -> None:
            sent.append(command)
            real(self, command, check_health)

        monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counting)
        assert manager.authenticate(issued.key).id == issued.record.id
        assert len(sent) == 1
        assert b"EVALSHA" in as_bytes(sent[0])
    finally:
        store.close()


def test_a_selective_listing_reads_a_bounded_number_of_records(make_store: MakeStore) -> None:
    """With scan_limit, a page stops early with a cursor; paging on finds every match."""
    store = make_store(scan_limit=5)
    clock = FakeClock()
    manager = KeyManager(store, clock=clock)
    ids = []
    for n in range(12):
        clock.advance(1)  # ids sort by creation time
        ids.append(manager.create(f"k{n}", owner="rare" if n in (3, 11) else "common").record.id)
    found, after, calls = [], None, 0
    while True:
        calls += 1
        page = store.list(KeyQuery(owner="rare", after=after, limit=10))
        found += [r.id for r in page.items]
        if page.next_cursor is None:
            break
        after = page.next_cursor
    assert found == [ids[3], ids[11]]
    assert calls == 3


# T25 ------------------------------------------------------------------------------


@pytest.mark.parametrize("bound", ["expiry", "grace"])
def test_t25_a_cache_entry_never_outlives_the_key(
    make_store: MakeStore, raw: redis.Redis, prefix: str, bound: str
) -> None:
    """With a 60 s cache TTL, an entry for a key (or old secret) ending in 2 s lasts 2 s."""
    clock = FakeClock()
    store = listening(make_store(clock=clock, cache_ttl=60))
    manager = KeyManager(store, clock=clock)
    issued = manager.create("svc", expires=timedelta(seconds=2) if bound == "expiry" else None)
    key = issued.key
    if bound == "grace":
        manager.rotate(issued.record.id, grace=timedelta(seconds=2))
    assert manager.authenticate(key).id == issued.record.id  # now cached
    # Behind the store's back (no message): only the cache can still answer.
    raw.delete("{" + prefix + "}:digest:" + digest(manager, key))
    clock.advance(1.999)
    assert store.find(digest(manager, key)) is not None
    clock.advance(0.001)
    assert store.find(digest(manager, key)) is None
    with pytest.raises(InvalidCredential):
        manager.authenticate(key)


# T26 ------------------------------------------------------------------------------


def test_t26_revocation_reaches_another_instance_through_pubsub(
    make_store: MakeStore, raw: redis.Redis, prefix: str
) -> None:
    """Instance B, holding the key in a 60 s cache, sees A's revocation within 1 s."""
    a = make_store()
    issued = KeyManager(a).create("svc")
    b = listening(make_store(cache_ttl=60))  # after the create: its message is gone
    reader = KeyManager(b)
    assert reader.authenticate(issued.key).name == "svc"
    record_key = "{" + prefix + "}:key:" + issued.record.id
    original = raw.hget(record_key, "record")
    assert original is not None
    raw.hset(record_key, "record", b"{}")  # behind the store's back: no message
    assert reader.authenticate(issued.key).name == "svc"  # so this came from B's cache
    raw.hset(record_key, "record", original)
    KeyManager(a).revoke(issued.record.id)
    start = time.monotonic()

    def revoked() -> bool:
        found = b.find(digest(reader, issued.key))
        return found is None or found.revoked_at is not None

    assert wait_until(revoked, timeout=1.0), "B still served the key after 1 s"
    assert time.monotonic() - start < 1.0


async def test_t26_async_face_revocation_through_pubsub(make_store: MakeStore) -> None:
    """The async face's listener task evicts a revoked key within 1 s too."""
    a = make_store()
    issued = await AsyncKeyManager(a).create("svc")
    b = await alistening(make_store(cache_ttl=60))
    reader = AsyncKeyManager(b)
    assert (await reader.authenticate(issued.key)).id == issued.record.id
    assert b.cache_sizes()[0] == 1  # held in B's cache for the next 60 s
    await AsyncKeyManager(a).revoke(issued.record.id)
    start = time.monotonic()
    while time.monotonic() - start < 1.0:
        found = await b.afind(digest(reader, issued.key))
        if found is not None and found.revoked_at is not None:
            break
        await asyncio.sleep(0.01)
    else:
        pytest.fail("B still served the key after 1 s")
    await b.aclose()
    await a.aclose()


# Run as source in the child: a test module imported by pytest (importlib mode) has no
# importable name in a spawned process.
_REVOKER = """
import time
from keyguard.backends.redis import RedisKeyStore
from keyguard.manager import KeyManager

store = RedisKeyStore.from_url(url, prefix=prefix)
try:
    KeyManager(store).revoke(key_id)
    revoked_at.put(time.time())
finally:
    store.close()
"""


@pytest.mark.slow
def test_t26_revocation_in_another_process_is_seen_within_a_second(
    make_store: MakeStore, redis_server: RedisServer, prefix: str
) -> None:
    """Process A revokes; this process (B), with the key cached for 60 s, sees it in < 1 s."""
    b = listening(make_store(cache_ttl=60))
    manager = KeyManager(b)
    issued = manager.create("svc")
    key_digest = digest(manager, issued.key)
    assert b.find(key_digest) is not None
    assert b.cache_sizes()[0] == 1
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(
        target=exec,
        args=(_REVOKER, {"url": redis_server.url, "prefix": prefix,
                         "key_id": issued.record.id, "revoked_at": queue}),
    )  # fmt: skip
    child.start()
    seen_at = None
    try:
        deadline = time.monotonic() + 60  # a spawned interpreter can be slow to start
        while seen_at is None and time.monotonic() < deadline and child.exitcode in (None, 0):
            found = b.find(key_digest)
            if found is None or found.revoked_at is not None:
                seen_at = time.time()
            time.sleep(0.005)
    finally:
        child.join(timeout=30)
    assert child.exitcode == 0
    revoked_at = queue.get(timeout=5)
    queue.close()
    queue.join_thread()
    assert seen_at is not None, "B never saw the revocation"
    assert seen_at - revoked_at < 1.0


def test_t26_lost_invalidations_still_end_at_the_cache_ttl(
    make_store: MakeStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With B's messages lost, B serves the revoked key for at most cache_ttl."""
    clock = FakeClock()
    a = make_store(clock=clock)
    issued = KeyManager(a, clock=clock).create("svc")
    b = listening(make_store(clock=clock, cache_ttl=5))
    reader = KeyManager(b, clock=clock)
    reader.authenticate(issued.key)
    monkeypatch.setattr(b._listener, "on_message", lambda message: None)
    KeyManager(a, clock=clock).revoke(issued.record.id)
    time.sleep(0.1)  # the message arrives and is dropped
    clock.advance(4.999)
    assert reader.authenticate(issued.key).id == issued.record.id  # stale, within TTL
    clock.advance(0.001)
    with pytest.raises(InvalidCredential):
        reader.authenticate(issued.key)


def test_t26_a_reconnected_listener_clears_the_cache(
    make_store: MakeStore, raw: redis.Redis
) -> None:
    """When the subscription drops and comes back, everything cached is dropped."""
    store = listening(make_store(cache_ttl=60))
    issued = KeyManager(store).create("svc")
    assert store.find(digest(KeyManager(store), issued.key)) is not None
    assert store.cache_sizes()[0] == 1
    raw.client_kill_filter(_type="pubsub")
    assert wait_until(lambda: store.cache_sizes() == (0, 0))
    assert wait_until(lambda: store.listening)


# T27 ------------------------------------------------------------------------------


def test_t27_a_flood_of_unknown_digests_is_bounded_and_spares_found_keys() -> None:
    """100k random digests: the negative cache stays at its bound, records survive."""
    clock = FakeClock()
    cache = RecordCache(ttl=5, size=100, negative_ttl=1, negative_size=1000, clock=clock)
    record = KeyRecord("key_1", "n", "h", (), clock.datetime(), clock.datetime())
    for n in range(50):
        cache.put(f"known-{n}", record, cache.epoch)
    for _ in range(100_000):
        cache.put(secrets.token_hex(32), None, cache.epoch)
    assert cache.sizes() == (50, 1000)
    assert all(cache.lookup(f"known-{n}") is not None for n in range(50))


def test_t27_through_the_store_unknown_then_created(make_store: MakeStore) -> None:
    """Unknown digests are remembered within bounds; creating the key ends that at once."""
    store = listening(make_store(negative_size=200))
    manager = KeyManager(store)
    known = manager.create("known")
    manager.authenticate(known.key)
    for _ in range(2000):
        assert store.find(secrets.token_hex(32)) is None
    assert store.cache_sizes() == (1, 200)
    assert store.find(digest(manager, known.key)) is not None
    key = KeyFormat().generate()
    assert store.find(digest(manager, key)) is None  # now remembered as unknown
    record = replace(manager.create("later").record, digests=(SecretDigest(digest(manager, key)),))
    store.save(record, AuditEvent(record.created_at, "admin", "rotate", record.id))
    assert manager.authenticate(key).id == record.id  # not 1 s later: at once


# T29 ------------------------------------------------------------------------------


def test_t29_redis_down_serves_fresh_entries_only(own_redis: RedisServer) -> None:
    """Redis killed: a cached key serves until its entry expires; the rest fail fast."""
    clock = FakeClock()
    store = listening(RedisKeyStore.from_url(own_redis.url, clock=clock, cache_ttl=5))
    try:
        manager = KeyManager(store, clock=clock)
        issued = manager.create("svc")
        manager.authenticate(issued.key)
        own_redis.kill()
        assert manager.authenticate(issued.key).id == issued.record.id
        calls: list[Callable[[], object]] = [
            lambda: store.find("1" * 64),
            lambda: store.get(issued.record.id),
        ]
        for call in calls:
            start = time.monotonic()
            with pytest.raises(StorageError) as caught:
                call()
            assert time.monotonic() - start < 1.0
            assert issued.key.reveal() not in str(caught.value)
        clock.advance(5)
        with pytest.raises(StorageError):
            manager.authenticate(issued.key)  # never stale: 503, not 200 and not 401
        own_redis.start()
        assert wait_until(lambda: store.listening)
        assert store.find(digest(manager, issued.key)) is None  # an empty server now
    finally:
        store.close()


def test_t29_a_hung_redis_costs_one_timeout(own_redis: RedisServer) -> None:
    """A server that accepts but never answers (SIGSTOP) fails the call within 1 s."""
    store = RedisKeyStore.from_url(own_redis.url)
    try:
        store.find("2" * 64)
        own_redis.pause()
        start = time.monotonic()
        with pytest.raises(StorageError):
            store.find("3" * 64)
        assert time.monotonic() - start < 1.0
    finally:
        own_redis.resume()
        store.close()


async def test_t29_async_face_redis_down(own_redis: RedisServer) -> None:
    """The async face serves a fresh cached key with Redis dead and fails fast otherwise."""
    clock = FakeClock()
    store = RedisKeyStore.from_url(own_redis.url, clock=clock, cache_ttl=5)
    manager = AsyncKeyManager(store, clock=clock)
    issued = await manager.create("svc")
    await alistening(store)
    await manager.authenticate(issued.key)
    own_redis.kill()
    assert (await manager.authenticate(issued.key)).id == issued.record.id
    start = time.monotonic()
    with pytest.raises(StorageError):
        await store.afind("4" * 64)
    assert time.monotonic() - start < 1.0
    clock.advance(5)
    with pytest.raises(StorageError):
        await manager.authenticate(issued.key)
    await store.aclose()


# the listeners' lifecycle ------------------------------------------------------------


def test_the_listener_thread_starts_on_first_find_and_stops_on_close(
    make_store: MakeStore,
) -> None:
    """No thread until a lookup; close() ends it; a closed store refuses calls."""
    before = set(listener_threads())
    store = make_store()
    KeyManager(store).create("sample")  # writes start nothing
    assert set(listener_threads()) == before
    store.find("0" * 64)
    assert len(set(listener_threads()) - before) == 1
    store.close()
    assert set(listener_threads()) <= before
    with pytest.raises(StorageError, match="closed"):
        store.find("0" * 64)


def test_an_unclosed_store_stops_its_thread_when_collected(redis_server: RedisServer) -> None:
    """Dropping the last reference to a store ends its listener thread."""
    before = set(listener_threads())
    store = listening(RedisKeyStore.from_url(redis_server.url))
    thread = (set(listener_threads()) - before).pop()
    client = store._client
    del store
    gc.collect()
    thread.join(timeout=2)
    assert not thread.is_alive()
    client.close()


def test_asyncio_run_per_call_leaves_no_task_thread_or_warning(
    redis_server: RedisServer,
) -> None:
    """Used from several short-lived loops, every client and task is closed with its loop."""
    store = RedisKeyStore.from_url(redis_server.url, prefix=f"kgtest-{uuid.uuid4().hex}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            assert asyncio.run(store.afind("0" * 64)) is None
        asyncio.run(store.aclose())
        gc.collect()
    assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []
    assert not any(t.name.startswith(THREAD) for t in threading.enumerate())


async def test_aclose_stops_the_listener_task(redis_server: RedisServer) -> None:
    """aclose() cancels and awaits this loop's task; nothing is left pending."""
    store = RedisKeyStore.from_url(redis_server.url, prefix=f"kgtest-{uuid.uuid4().hex}")
    assert await store.afind("0" * 64) is None
    tasks = [t for t in asyncio.all_tasks() if t.get_name().startswith("keyguard-redis")]
    assert len(tasks) == 1
    await store.aclose()
    assert tasks[0].done()
    with pytest.raises(StorageError, match="closed"):
        await store.afind("0" * 64)


# configuration -------------------------------------------------------------------


def test_every_redis_scheme_is_registered(redis_server: RedisServer) -> None:
    """open_key_store knows the four Redis schemes and passes options through."""
    store = open_key_store(redis_server.url, prefix="kgtest-open", cache_ttl=0)
    try:
        assert isinstance(store, RedisKeyStore)
        assert store.prefix == "kgtest-open"
    finally:
        store.close()
    with pytest.raises(ConfigurationError, match="service"):
        open_key_store("redis+sentinel://127.0.0.1:26379")


def test_a_missing_driver_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without redis-py installed, the URL fails with the extra to install."""
    for name in [m for m in sys.modules if m == "redis" or m.startswith("redis.")]:
        monkeypatch.delitem(sys.modules, name)
    for name in [m for m in sys.modules if m.startswith("keyguard.backends._redis")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.delitem(sys.modules, "keyguard.backends.redis")
    monkeypatch.setitem(sys.modules, "redis", None)
    with pytest.raises(ConfigurationError, match=r"keyguard\[redis\]"):
        open_key_store("redis://127.0.0.1:1/0")


@pytest.mark.parametrize(
    "options",
    [{"prefix": ""}, {"prefix": "a{b}"}, {"cache_ttl": -1}, {"negative_size": 1.5},
     {"audit_size": 0}, {"scan_limit": True}],
)  # fmt: skip
def test_bad_options_are_configuration_errors(
    redis_server: RedisServer, options: dict[str, object]
) -> None:
    """Each store option is checked when the store is built."""
    with pytest.raises(ConfigurationError):
        RedisKeyStore.from_url(redis_server.url, **options)
