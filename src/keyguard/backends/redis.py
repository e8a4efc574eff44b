"""Keys in Redis, for several processes or machines; single server, Sentinel or Cluster.

Records are the JSON of :func:`keyguard.codec.storage_dict`; the layout and the Lua
scripts are described in :mod:`keyguard.backends._redis_scripts`. In short: every write
is one script (record, digest index, id index, audit trail and an invalidation message,
atomically), every lookup one round trip, and all of a store's keys share the hash tag
``{prefix}``, so a store lives in one Cluster slot.

``find`` is answered from a per-process cache when it can be (see
:mod:`keyguard.backends._redis_cache`): entries live ``cache_ttl`` seconds at most and
never past the key's expiry, and every save or delete evicts them in every process at
once through pub/sub. ``get`` is not cached: admin operations read a record, change it
and save it back, and a stale read there could undo a revocation made elsewhere.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

from redis.commands.core import AsyncScript
from redis.exceptions import ResponseError

from ..clock import Clock, SystemClock
from ..codec import audit_from_dict
from ..errors import ConfigurationError, StorageError, shown
from ..records import AuditEvent, KeyPage, KeyQuery, KeyRecord
from ._redis_cache import DRIVER_ERRORS, RecordCache, Subscription, ThreadListener, serve, stop_soon
from ._redis_client import AsyncClient, SyncClient, loop_clients
from ._redis_scripts import (
    DIGEST_TAKEN,
    Calls,
    Scripts,
    adrive,
    drive,
    page_flow,
    record_of,
    stored,
)

__all__ = ["RedisKeyStore"]

T = TypeVar("T")
_STORE_OPTIONS = frozenset(
    {"prefix", "cache_ttl", "cache_size", "negative_ttl", "negative_size", "audit_size"}
    | {"scan_limit", "clock"}
)


@contextmanager
def _storage_errors(action: str) -> Iterator[None]:
    """Driver errors become :class:`StorageError`; the message names only the action."""
    try:
        yield
    except ResponseError as exc:
        if DIGEST_TAKEN in str(exc):
            raise StorageError("a digest already belongs to another key") from None
        raise StorageError(f"the Redis key store could not {action}") from exc
    except DRIVER_ERRORS as exc:
        raise StorageError(f"the Redis key store could not {action}") from exc


def _events(rows: Sequence[object]) -> list[AuditEvent]:
    return [audit_from_dict(stored(row, "audit event")) for row in rows]


class _LoopState:
    """One event loop's async client, its scripts, and the task that owns them."""

    __slots__ = ("client", "loop", "scripts", "subscription", "task")

    def __init__(self, client: AsyncClient, loop: asyncio.AbstractEventLoop) -> None:
        self.client = client
        self.loop = loop
        self.scripts: Scripts[AsyncScript] = Scripts(client.register_script)
        self.subscription: Subscription | None = None
        self.task: asyncio.Task[None] | None = None


class RedisKeyStore:
    """A key store in Redis, with both the sync and the async face.

    :param client: the sync client (``redis.Redis`` or ``redis.cluster.RedisCluster``).
    :param async_client: makes an async client; called once per event loop the async
        face is used from, because a redis-py async client belongs to one loop.
    :param prefix: the namespace, also the Cluster hash tag: ``{prefix}:key:<id>``...
    :param cache_ttl: seconds ``find`` may answer from the process's cache (0: never).
        This bounds how long a change can go unseen while pub/sub is down.
    :param cache_size: cached records (least recently used dropped first).
    :param negative_ttl: seconds an unknown digest is remembered as unknown (0: never).
    :param negative_size: unknown digests remembered, apart from (and never evicting)
        cached records.
    :param audit_size: audit events kept, newest first.
    :param scan_limit: records one ``list`` call reads at most (see :meth:`list`).
    :param clock: the time source for cache lifetimes and grace-period TTLs.

    Invalidations arrive on a background thread (sync face) or a task per event loop
    (async face), started on first use and stopped by :meth:`close` / :meth:`aclose`.

    **Security note**: Redis holds digests and display hints, never a key; without a
    pepper the digests are plain SHA-256 of high-entropy keys. While Redis is down,
    ``find`` serves a cached record until its entry expires (at most ``cache_ttl``),
    then raises :class:`StorageError`; it never answers from an expired entry.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        client: SyncClient,
        async_client: Callable[[], AsyncClient],
        *,
        prefix: str = "keyguard",
        cache_ttl: float = 5.0,
        cache_size: int = 10_000,
        negative_ttl: float = 1.0,
        negative_size: int = 10_000,
        audit_size: int = 10_000,
        scan_limit: int = 10_000,
        clock: Clock | None = None,
    ) -> None:
        if (
            not isinstance(prefix, str)
            or not 0 < len(prefix) <= 64
            or not prefix.isprintable()
            or "{" in prefix
            or "}" in prefix
        ):
            raise ConfigurationError(
                f"prefix must be 1-64 printable characters without braces, not {shown(prefix)}"
            )
        for name, value in (("audit_size", audit_size), ("scan_limit", scan_limit)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"{name} must be a whole number >= 1, not {shown(value)}")
        self.prefix = prefix
        self.clock: Clock = clock or SystemClock()
        self._calls = Calls(prefix, self.clock, audit_size)
        self._scan_limit = scan_limit
        self._client = client
        self._scripts = Scripts(client.register_script)
        self._new_async = async_client
        self._cache = RecordCache(
            ttl=cache_ttl, size=cache_size, negative_ttl=negative_ttl,
            negative_size=negative_size, clock=self.clock,
        )  # fmt: skip
        self._listener = ThreadListener(
            client, self._cache, self._calls.channel, self._calls.origin
        )
        self._loops: dict[asyncio.AbstractEventLoop, _LoopState] = {}
        self._lock = threading.Lock()
        self._closed = False
        # An unclosed store still stops its thread when collected.
        weakref.finalize(self, self._listener.signal_stop)

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RedisKeyStore:
        """``redis://``, ``rediss://``, ``redis+sentinel://host:26379/service`` or
        ``redis+cluster://host:port``.

        Store options (``prefix``, ``cache_ttl``...) go to the constructor; the others
        (``socket_timeout``, ``max_connections``...) to the shared client bridge,
        :func:`keyguard.backends._redis_client.redis_clients`. The first event loop
        uses the async client built here; each further loop builds its own, which on a
        Cluster means one blocking read of the slot map in that loop's first call.
        """
        store_options = {k: v for k, v in options.items() if k in _STORE_OPTIONS}
        client_options = {k: v for k, v in options.items() if k not in _STORE_OPTIONS}
        sync, new_async = loop_clients(url, _storage_errors, **client_options)
        return cls(sync, new_async, **store_options)

    def __repr__(self) -> str:
        return f"RedisKeyStore(prefix={self.prefix!r})"

    @property
    def listening(self) -> bool:
        """Whether an invalidation subscription is live now (for health checks)."""
        with self._lock:
            subscriptions = [s.subscription for s in self._loops.values()]
        return self._listener.listening or any(s is not None and s.listening for s in subscriptions)

    def cache_sizes(self) -> tuple[int, int]:
        """How many records and unknown digests the cache holds, for metrics and tests."""
        return self._cache.sizes()

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError("the Redis key store is closed")

    def _found(self, digest: str, data: object, epoch: int) -> KeyRecord | None:
        record = None if data is None else record_of(data)
        self._cache.put(digest, record, epoch)
        return record

    def _written(self, message: object) -> None:
        """Evict this store's entries now; its listener skips the echo of the message."""
        if message is not None:
            self._cache.apply(message)

    # sync face

    def get(self, key_id: str) -> KeyRecord | None:
        self._check_open()
        with _storage_errors("read a key"):
            data = self._client.hget(self._calls.record + key_id, "record")
        return None if data is None else record_of(data)

    def find(self, digest: str) -> KeyRecord | None:
        """The record ``digest`` belongs to: from the cache, or in one round trip."""
        self._check_open()
        if self._cache.enabled:
            self._listener.ensure_running()
            entry = self._cache.lookup(digest)
            if entry is not None:
                return entry.record
        epoch = self._cache.epoch
        with _storage_errors("look up a key"):
            data = self._scripts.find(*self._calls.find(digest))
        return self._found(digest, data, epoch)

    def save(self, record: KeyRecord, event: AuditEvent) -> None:
        """Write the record, index its digests and append ``event``, atomically."""
        self._check_open()
        with _storage_errors("save a key"):
            self._written(self._scripts.save(*self._calls.save(record, event)))

    def delete(self, key_id: str, event: AuditEvent) -> bool:
        """Remove the record and its digests; ``False`` (and no audit event) if unknown."""
        self._check_open()
        with _storage_errors("delete a key"):
            message = self._scripts.delete(*self._calls.delete(key_id, event))
        self._written(message)
        return message is not None

    def list(self, query: KeyQuery) -> KeyPage:
        """A page of keys in id (creation) order.

        Filters are applied to the records as they are read, at most ``scan_limit``
        per call, so that one call's work is bounded: with a selective filter a page
        can come back short with a cursor to go on from. A listing is complete only
        when ``next_cursor`` is ``None``.
        """
        self._check_open()
        flow = page_flow(query, self._scan_limit)
        with _storage_errors("list keys"):
            return drive(flow, lambda start, n: self._scripts.page(*self._calls.page(start, n)))

    def audit(self, key_id: str | None = None, limit: int = 100) -> Sequence[AuditEvent]:
        """The newest audit events first, for one key or for all."""
        self._check_open()
        if limit < 1:
            return []
        with _storage_errors("read the audit trail"):
            if key_id is None:
                rows = self._client.lrange(self._calls.audit, 0, limit - 1)
            else:
                rows = self._scripts.audit(*self._calls.audit_of(key_id, limit))
        return _events(rows)

    def close(self) -> None:
        """Stop the listeners and release connections; later calls raise StorageError."""
        with self._lock:
            self._closed = True
            states = list(self._loops.values())
            self._loops.clear()
        self._listener.stop()
        for state in states:
            stop_soon(state.task, state.loop)
        with _storage_errors("close"):
            self._client.close()

    # async face

    async def _state(self) -> _LoopState:
        """This loop's client, created (with the task that owns it) on first use."""
        loop = asyncio.get_running_loop()
        state = self._loops.get(loop)
        if state is not None:
            return state
        with self._lock:
            self._check_open()
            for old in [s for s in self._loops.values() if s.loop.is_closed()]:
                del self._loops[old.loop]
            state = _LoopState(self._new_async(), loop)
            self._loops[loop] = state
        if self._cache.enabled:
            state.subscription = Subscription(self._cache, self._calls.channel, self._calls.origin)
        state.task = loop.create_task(
            serve(state.client, state.subscription), name=f"keyguard-redis:{self.prefix}"
        )
        # Let the task enter its try block now: a task cancelled before it first runs
        # skips its finally, and the client it owns would never be closed.
        await asyncio.sleep(0)
        return state

    async def _run(self, action: str, call: Callable[[_LoopState], Awaitable[T]]) -> T:
        self._check_open()
        state = await self._state()
        with _storage_errors(action):
            return await call(state)

    async def aget(self, key_id: str) -> KeyRecord | None:
        key = self._calls.record + key_id
        data = await self._run("read a key", lambda s: s.client.hget(key, "record"))
        return None if data is None else record_of(data)

    async def afind(self, digest: str) -> KeyRecord | None:
        self._check_open()
        state = await self._state()
        if self._cache.enabled:
            entry = self._cache.lookup(digest)
            if entry is not None:
                return entry.record
        epoch = self._cache.epoch
        with _storage_errors("look up a key"):
            data = await state.scripts.find(*self._calls.find(digest))
        return self._found(digest, data, epoch)

    async def asave(self, record: KeyRecord, event: AuditEvent) -> None:
        keys, args = self._calls.save(record, event)
        self._written(await self._run("save a key", lambda s: s.scripts.save(keys, args)))

    async def adelete(self, key_id: str, event: AuditEvent) -> bool:
        keys, args = self._calls.delete(key_id, event)
        message = await self._run("delete a key", lambda s: s.scripts.delete(keys, args))
        self._written(message)
        return message is not None

    async def alist(self, query: KeyQuery) -> KeyPage:
        self._check_open()
        state = await self._state()
        flow = page_flow(query, self._scan_limit)
        with _storage_errors("list keys"):
            return await adrive(flow, lambda a, n: state.scripts.page(*self._calls.page(a, n)))

    async def aaudit(self, key_id: str | None = None, limit: int = 100) -> Sequence[AuditEvent]:
        if limit < 1:
            return []
        action, audit = "read the audit trail", self._calls.audit
        if key_id is None:
            rows = await self._run(action, lambda s: s.client.lrange(audit, 0, limit - 1))
        else:
            keys, args = self._calls.audit_of(key_id, limit)
            rows = await self._run(action, lambda s: s.scripts.audit(keys, args))
        return _events(rows)

    async def aclose(self) -> None:
        """Stop every listener and close every client; this loop's are awaited."""
        with self._lock:
            self._closed = True
            mine = self._loops.pop(asyncio.get_running_loop(), None)
        if mine is not None and mine.task is not None:
            mine.task.cancel()
            await asyncio.gather(mine.task, return_exceptions=True)
        # Joining the listener thread may take a poll interval: not on the loop.
        await asyncio.to_thread(self.close)
