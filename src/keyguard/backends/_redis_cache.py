"""The Redis key store's per-process read cache and the pub/sub listeners that evict it.

Authentication asks the key store for the same few digests again and again; a cache
in the process answers those in about a microsecond instead of a network round trip.
What it may serve is bounded three ways:

* **time**: an entry lives at most ``ttl`` seconds, and never past the key's expiry,
  a scheduled revocation or the end of the looked-up secret's grace period
  (SECURITY a.6: ``min(ttl, expires_at - now)``);
* **invalidation**: every write publishes the affected digests; each store's listener
  evicts them at once. When the subscription drops, entries still expire within
  ``ttl``; when it is (re-)established, the whole cache is cleared, because messages
  may have been missed in between;
* **size**: positive entries are an LRU of ``size``; unknown digests go to a separate
  FIFO with a short TTL, so a flood of random keys can neither grow memory
  nor push out the keys real clients use (T27).

A lookup that raced with an invalidation must not put back what was just evicted, so
every eviction bumps an epoch and an answer read under an older epoch is not cached.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

from redis.asyncio.cluster import RedisCluster as AsyncCluster
from redis.exceptions import RedisClusterException, RedisError

from ..clock import Clock
from ..errors import ConfigurationError, shown
from ..records import KeyRecord
from ._redis_client import AsyncClient, SyncClient

__all__ = [
    "DRIVER_ERRORS",
    "CacheEntry",
    "RecordCache",
    "Subscription",
    "ThreadListener",
    "serve",
    "stop_soon",
]

_logger = logging.getLogger("keyguard.backends.redis")
DRIVER_ERRORS = (RedisError, RedisClusterException, OSError)


class CacheEntry:
    """A cached answer: the record, or ``None`` for a digest Redis did not know."""

    __slots__ = ("deadline", "record")

    def __init__(self, record: KeyRecord | None, deadline: float) -> None:
        self.record = record
        self.deadline = deadline


def _non_negative(name: str, value: object, kind: type[int] | type[float]) -> None:
    allowed = (int,) if kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, allowed) or value < 0:
        raise ConfigurationError(f"{name} must be a number >= 0, not {shown(value)}")


class RecordCache:
    """Digest → record answers of ``find``, bounded in time and size; thread-safe.

    :param ttl: seconds a found record may be served without asking Redis (0: off).
    :param size: how many found records to keep (least recently used dropped first).
    :param negative_ttl: seconds an unknown digest is remembered as unknown (0: off).
    :param negative_size: how many unknown digests to remember (oldest dropped first).
    """

    def __init__(
        self, *, ttl: float, size: int, negative_ttl: float, negative_size: int, clock: Clock
    ) -> None:
        _non_negative("cache_ttl", ttl, float)
        _non_negative("cache_size", size, int)
        _non_negative("negative_ttl", negative_ttl, float)
        _non_negative("negative_size", negative_size, int)
        self.ttl, self.size = float(ttl), size
        self.negative_ttl, self.negative_size = float(negative_ttl), negative_size
        self.enabled = (ttl > 0 and size > 0) or (negative_ttl > 0 and negative_size > 0)
        self._clock = clock
        self._lock = threading.Lock()
        self._found: OrderedDict[str, CacheEntry] = OrderedDict()
        self._unknown: OrderedDict[str, float] = OrderedDict()
        self._unknown_entry = CacheEntry(None, float("inf"))
        self.epoch = 0  # read without the lock: an int read is atomic

    def sizes(self) -> tuple[int, int]:
        """How many found records and unknown digests are held now."""
        return len(self._found), len(self._unknown)

    def lookup(self, digest: str) -> CacheEntry | None:
        """The live entry for ``digest``, or ``None`` when Redis must be asked."""
        now = self._clock.monotonic()
        with self._lock:
            entry = self._found.get(digest)
            if entry is not None:
                if now < entry.deadline:
                    self._found.move_to_end(digest)
                    return entry
                del self._found[digest]
            deadline = self._unknown.get(digest)
            if deadline is not None:
                if now < deadline:
                    return self._unknown_entry
                del self._unknown[digest]
        return None

    def put(self, digest: str, record: KeyRecord | None, epoch: int) -> None:
        """Remember Redis's answer for ``digest``, read when the epoch was ``epoch``."""
        lifetime = self._lifetime(record, digest)
        if lifetime <= 0:
            return
        deadline = self._clock.monotonic() + lifetime
        with self._lock:
            if epoch != self.epoch:  # evicted while we were asking: the answer may be stale
                return
            if record is None:
                self._unknown[digest] = deadline
                while len(self._unknown) > self.negative_size:
                    self._unknown.popitem(last=False)
                return
            self._unknown.pop(digest, None)
            self._found[digest] = CacheEntry(record, deadline)
            self._found.move_to_end(digest)
            while len(self._found) > self.size:
                self._found.popitem(last=False)

    def _lifetime(self, record: KeyRecord | None, digest: str) -> float:
        if record is None:
            return self.negative_ttl if self.negative_size else 0.0
        if not self.size:
            return 0.0
        now = self._clock.now()
        ends = [record.expires_at] + [d.valid_until for d in record.digests if d.digest == digest]
        if record.revoked_at is not None and record.revoked_at.timestamp() > now:
            ends.append(record.revoked_at)
        return min([self.ttl] + [end.timestamp() - now for end in ends if end is not None])

    def evict(self, digests: Iterable[str]) -> None:
        """Forget ``digests`` (found or unknown) at once."""
        with self._lock:
            self.epoch += 1
            for digest in digests:
                self._found.pop(digest, None)
                self._unknown.pop(digest, None)

    def clear(self) -> None:
        """Forget everything, e.g. after invalidation messages may have been missed."""
        with self._lock:
            self.epoch += 1
            self._found.clear()
            self._unknown.clear()

    def apply(self, payload: object, *, skip_origin: str | None = None) -> None:
        """Evict what an invalidation message (JSON ``[origin, id, digest, ...]``) names.

        A message from ``skip_origin`` is ignored: that store evicted its own entries
        when its write returned, and the echo arriving later would only evict the fresh
        answers read since. A message that cannot be read clears the whole cache: it is
        safer to ask Redis again than to guess what the message meant.
        """
        try:
            items = json.loads(payload) if isinstance(payload, bytes | str) else None
        except (ValueError, RecursionError):
            items = None
        if (
            not isinstance(items, list)
            or len(items) < 2
            or not all(isinstance(i, str) for i in items)
        ):
            self.clear()
        elif items[0] != skip_origin:
            self.evict(items[2:])


class Subscription:
    """What both listeners do with a pub/sub message, and the transitions they log."""

    def __init__(self, cache: RecordCache, channel: str, origin: str) -> None:
        self.cache = cache
        self.channel = channel
        self.origin = origin
        self.listening = False
        self._lost = False

    def on_message(self, message: Mapping[str, Any]) -> None:
        kind = message.get("type")
        if kind in ("subscribe", b"subscribe"):
            # Messages sent while we were not subscribed are lost: start afresh.
            self.cache.clear()
            self.listening = True
            if self._lost:
                self._lost = False
                _logger.info("keyguard key cache: invalidation channel back; cache cleared")
        elif kind in ("message", b"message"):
            self.cache.apply(message.get("data"), skip_origin=self.origin)

    def on_lost(self) -> None:
        if self.listening:
            self.listening = False
            self._lost = True
            _logger.warning(
                "keyguard key cache: invalidation channel lost; cached keys now expire "
                "within %s s until it is back",
                self.cache.ttl,
            )


class ThreadListener(Subscription):
    """The sync face's listener: one daemon thread per store, started on first use.

    Why a thread, when keyguard otherwise never starts one: a WSGI server has no event
    loop, and revocation must reach every process at once (DESIGN, Keys) rather than
    when a request next happens to ask. The thread only reads the channel and evicts
    entries; it holds no reference to the store, so an unclosed store is still
    collected (its finalizer stops the thread), and it waits at most ``poll`` seconds
    between checks of its stop flag.
    """

    def __init__(
        self,
        client: SyncClient,
        cache: RecordCache,
        channel: str,
        origin: str,
        *,
        poll: float = 0.05,
        retry: float = 0.5,
    ) -> None:
        super().__init__(cache, channel, origin)
        self._client = client
        self._poll = poll
        self._retry = retry
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def ensure_running(self) -> None:
        """Start the thread unless it runs (cheap when it does; restarts after fork)."""
        thread = self._thread
        if thread is not None and thread.is_alive():
            return
        with self._lock:
            if self._stop.is_set() or (self._thread is not None and self._thread.is_alive()):
                return
            self.listening = False
            self._thread = threading.Thread(
                target=self._run, name=f"keyguard-redis-invalidation:{self.channel}", daemon=True
            )
            self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the thread and wait for it (up to ``timeout``); it never restarts."""
        self._stop.set()
        with self._lock:
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def signal_stop(self) -> None:
        """Ask the thread to end without waiting (for finalizers)."""
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            pubsub = self._client.pubsub(ignore_subscribe_messages=False)  # type: ignore[no-untyped-call, unused-ignore]
            try:
                pubsub.subscribe(self.channel)
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=self._poll)
                    if message is not None:
                        self.on_message(message)
            except DRIVER_ERRORS:
                self.on_lost()
            finally:
                try:
                    pubsub.close()
                except DRIVER_ERRORS:
                    _logger.debug("keyguard key cache: closing the subscription failed")
            self._stop.wait(self._retry)
        self.listening = False


async def listen(client: AsyncClient, subscription: Subscription, *, retry: float = 0.5) -> None:
    """The async face's listener: read the channel until cancelled, re-subscribing.

    redis-py can swallow a cancellation that lands mid-command (seen with the Cluster
    client), so the loop also checks whether one was requested before each read;
    otherwise ``asyncio.run`` would wait for this task forever at shutdown.
    """
    while True:
        pubsub = client.pubsub(ignore_subscribe_messages=False)
        try:
            if isinstance(client, AsyncCluster):
                # pubsub() routes by the slot map, which this client loads lazily
                await client.initialize()
            await pubsub.subscribe(subscription.channel)
            while True:
                _raise_if_cancelled()
                message = await pubsub.get_message(timeout=0.25)
                if message is not None:
                    subscription.on_message(message)
        except DRIVER_ERRORS:
            _raise_if_cancelled()
            subscription.on_lost()
        finally:
            subscription.listening = False
            try:
                await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]
            except DRIVER_ERRORS:
                _logger.debug("keyguard key cache: closing the subscription failed")
        await asyncio.sleep(retry)


def _raise_if_cancelled() -> None:
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def serve(client: AsyncClient, subscription: Subscription | None) -> None:
    """One event loop's task: listen (when caching) until cancelled, then close ``client``.

    The loop's shutdown (``asyncio.run``, ``asyncio.Runner``) cancels this task, so the
    client's connections are closed inside the loop that owns them, without warnings.
    """
    try:
        if subscription is not None:
            await listen(client, subscription)
        else:
            await asyncio.get_running_loop().create_future()  # until cancelled
    finally:
        try:
            await client.aclose()
        except DRIVER_ERRORS:
            _logger.debug("keyguard key store: closing a Redis client failed")


def stop_soon(task: asyncio.Task[None] | None, loop: asyncio.AbstractEventLoop) -> None:
    """Cancel a loop's task from anywhere; a closed loop has cancelled it already."""
    if task is None or task.done() or loop.is_closed():
        return
    try:
        running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is not loop and loop.is_running():
        loop.call_soon_threadsafe(task.cancel)
    else:
        task.cancel()  # runs when the loop next runs, at the latest as it shuts down
