"""Sync and async Redis clients from one URL, with every setting that matters explicit.

The one place keyguard builds redis-py clients; the rate store and the key store both
use it. redis-py's defaults changed between releases (7.4: no socket timeout, three
retries backing off up to 10 s; 8.x: 5 s timeouts, ten retries), and a retry re-sends
commands that are not idempotent (``EVALSHA``, ``INCR``) after a reply timed out,
charging twice (SECURITY c.1, c.2). So nothing is left to a default:

* short timeouts: ``socket_connect_timeout`` 50 ms, ``socket_timeout`` 100 ms, so a dead
  or hung server costs one bounded wait, never a hang;
* **no retries** (``Retry(NoBackoff(), 0)``): a caller that knows its command is
  idempotent may ask for ``retries=``; the admission script never does;
* a bounded pool (``max_connections``), and for single servers a bounded wait for a free
  connection (``pool_timeout``) instead of an error or an unbounded queue;
* ``health_check_interval``: a connection idle that long is PINGed before reuse; TCP
  keepalive on, with its timers shortened (first probe after 15 s idle, then every 5 s,
  dead after 3 unanswered: about 30 s) where the platform allows, so a connection a
  partition killed is found while it sits idle in the pool and replaced when next
  taken out, instead of failing a request. The kernel's default (two hours before the
  first probe) finds nothing in time.

URLs:

* ``redis://[user:password@]host[:6379][/db]`` and ``rediss://`` (TLS), as redis-py
  parses them (query options such as ``?ssl_cert_reqs=`` are honoured and win);
* ``redis+sentinel://[user:password@]host[:26379][,host2[:26379]...]/service[?db=N]``:
  the master of ``service``, found through the sentinels; ``sentinel_password=`` when
  the sentinels themselves require one;
* ``redis+cluster://[user:password@]host[:6379][,host2[:port]...]``: Redis Cluster, from
  any of its nodes.

:class:`CircuitBreaker` makes a dead server cost nothing per request.

Other keyword options go to redis-py unchanged (``ssl=True`` for a TLS cluster,
``client_name``, ``decode_responses``...). The async client must be used from one
event loop (its connections belong to the loop that opened them).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, TypeAlias
from urllib.parse import parse_qs, unquote, urlsplit

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.retry
import redis.asyncio.sentinel
import redis.cluster
import redis.sentinel
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException
from redis.retry import Retry

from ..errors import ConfigurationError, StorageError, shown

__all__ = ["AsyncClient", "CircuitBreaker", "SyncClient", "loop_clients", "redis_clients"]

SyncClient: TypeAlias = redis.Redis | redis.cluster.RedisCluster
AsyncClient: TypeAlias = redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster
SCHEMES = ("redis", "rediss", "redis+sentinel", "redis+cluster")
# TCP keepalive timers (seconds idle before the first probe, between probes, probes
# unanswered before the connection is dead), for the platforms that name them.
KEEPALIVE: dict[int, int] = {
    getattr(socket, name): value
    for name, value in (("TCP_KEEPIDLE", 15), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3))
    if hasattr(socket, name)
}
_logger = logging.getLogger("keyguard")


def _seconds(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 3600:
        raise ConfigurationError(f"{name} must be seconds in (0, 3600], not {shown(value)}")
    return float(value)


def _count(name: str, value: object, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ConfigurationError(f"{name} must be a whole number >= {least}, not {shown(value)}")
    return value


def _hosts(netloc: str, default_port: int) -> tuple[dict[str, str], list[tuple[str, int]]]:
    """``user:password@h1:p1,h2:p2`` as credentials and ``(host, port)`` pairs."""
    userinfo, _, hostlist = netloc.rpartition("@")
    auth: dict[str, str] = {}
    if userinfo:
        user, colon, password = userinfo.partition(":")
        if user:
            auth["username"] = unquote(user)
        if colon:
            auth["password"] = unquote(password)
    hosts = []
    for item in hostlist.split(","):
        if item.startswith("["):  # [::1]:6379
            host, _, rest = item[1:].partition("]")
            port = rest.removeprefix(":")
        else:
            host, _, port = item.partition(":")
        if not host or (port and not port.isdigit()):
            raise ConfigurationError(f"{shown(item)} is not a host[:port]")
        hosts.append((host, int(port) if port else default_port))
    return auth, hosts


def redis_clients(
    url: str,
    *,
    socket_timeout: float = 0.1,
    socket_connect_timeout: float = 0.05,
    max_connections: int = 64,
    pool_timeout: float = 0.05,
    health_check_interval: int = 30,
    retries: int = 0,
    **extra: Any,
) -> tuple[SyncClient, AsyncClient]:
    """A sync and an async client for ``url``, configured as the module docstring says.

    :param socket_timeout: seconds to wait for a reply (per command, not per request).
    :param socket_connect_timeout: seconds to wait for a TCP (and TLS) connection.
    :param max_connections: connections per pool (per node on a Cluster).
    :param pool_timeout: seconds a caller waits for a free connection (single server
        and TLS only; Sentinel and Cluster pools fail at once when full).
    :param health_check_interval: seconds idle after which a connection is PINGed
        before it is reused.
    :param retries: immediate retries on connection errors and timeouts; leave 0 for
        anything that is not idempotent.
    :raises ConfigurationError: for an unknown scheme or a bad setting.
    :raises StorageError: when a Cluster cannot be reached: its sync client reads the
        slot map here. Nothing else connects before its first command.

    .. versionadded:: 0.1
    """
    scheme = urlsplit(url).scheme if isinstance(url, str) else ""
    if scheme not in SCHEMES:
        raise ConfigurationError(
            f"{shown(url)} is not a Redis URL; use " + ", ".join(f"{s}://" for s in SCHEMES)
        )
    common: dict[str, Any] = {
        "socket_timeout": _seconds("socket_timeout", socket_timeout),
        "socket_connect_timeout": _seconds("socket_connect_timeout", socket_connect_timeout),
        "socket_keepalive": True,
        "socket_keepalive_options": dict(KEEPALIVE),
        "health_check_interval": _count("health_check_interval", health_check_interval, 0),
        **extra,
    }
    size = _count("max_connections", max_connections, 1)
    wait = _seconds("pool_timeout", pool_timeout)
    tries = _count("retries", retries, 0)
    sync_retry = Retry(NoBackoff(), tries)
    async_retry = redis.asyncio.retry.Retry(NoBackoff(), tries)
    if scheme == "redis+cluster":
        return _cluster(url, common, size, sync_retry, async_retry)
    if scheme == "redis+sentinel":
        return _sentinel(url, common, size, sync_retry, async_retry)
    sync_pool = redis.BlockingConnectionPool.from_url(
        url, max_connections=size, timeout=wait, retry=sync_retry, **common
    )
    async_pool = redis.asyncio.BlockingConnectionPool.from_url(
        url, max_connections=size, timeout=wait, retry=async_retry, **common
    )
    return redis.Redis.from_pool(sync_pool), redis.asyncio.Redis.from_pool(async_pool)


def _cluster(
    url: str,
    common: dict[str, Any],
    size: int,
    sync_retry: Retry,
    async_retry: redis.asyncio.retry.Retry,
) -> tuple[SyncClient, AsyncClient]:
    parts = urlsplit(url)
    if parts.path.strip("/") or parts.query:
        raise ConfigurationError("a redis+cluster:// URL takes hosts only (a Cluster has no db)")
    auth, hosts = _hosts(parts.netloc, 6379)
    options = {**common, **auth, "max_connections": size}
    nodes = [redis.cluster.ClusterNode(h, p) for h, p in hosts]  # type: ignore[no-untyped-call]
    try:  # the sync client reads the slot map now (the async one on first use)
        sync = redis.cluster.RedisCluster(startup_nodes=nodes, retry=sync_retry, **options)
    except (redis.RedisError, RedisClusterException) as exc:
        raise StorageError("could not read the Redis Cluster's slot map") from exc
    aio = redis.asyncio.cluster.RedisCluster(
        startup_nodes=[redis.asyncio.cluster.ClusterNode(h, p) for h, p in hosts],
        retry=async_retry,
        **options,
    )
    return sync, aio


def _sentinel(
    url: str,
    common: dict[str, Any],
    size: int,
    sync_retry: Retry,
    async_retry: redis.asyncio.retry.Retry,
) -> tuple[SyncClient, AsyncClient]:
    parts = urlsplit(url)
    service = unquote(parts.path.strip("/"))
    if not service or "/" in service:
        raise ConfigurationError("a redis+sentinel:// URL ends in /<service name>")
    query = parse_qs(parts.query)
    db = query.pop("db", ["0"])[-1]
    if query or not db.isdigit():
        raise ConfigurationError("a redis+sentinel:// URL takes only ?db=<number>")
    auth, hosts = _hosts(parts.netloc, 26379)
    options = dict(common)
    asking: dict[str, Any] = {  # how the sentinels themselves are asked: no retries either
        "socket_timeout": options["socket_timeout"],
        "socket_connect_timeout": options["socket_connect_timeout"],
        "socket_keepalive": options["socket_keepalive"],
        "socket_keepalive_options": options["socket_keepalive_options"],
    }
    sentinel_password = options.pop("sentinel_password", None)
    if sentinel_password is not None:
        asking["password"] = sentinel_password
    master = {**options, **auth, "db": int(db), "max_connections": size}
    # master_for gives a Redis of each kind.
    sync_asking, async_asking = {**asking, "retry": sync_retry}, {**asking, "retry": async_retry}
    watch = redis.sentinel.Sentinel(hosts, sentinel_kwargs=sync_asking)
    awatch = redis.asyncio.sentinel.Sentinel(hosts, sentinel_kwargs=async_asking)
    sync: redis.Redis = watch.master_for(
        service, redis_class=_SentinelMaster, retry=sync_retry, **master
    )
    aio: redis.asyncio.Redis = awatch.master_for(
        service, redis_class=_AsyncSentinelMaster, retry=async_retry, **master
    )
    return sync, aio


def _sentinels(client: redis.Redis | redis.asyncio.Redis) -> list[Any]:
    manager = getattr(client.connection_pool, "sentinel_manager", None)
    return list(getattr(manager, "sentinels", ()))


class _SentinelMaster(redis.Redis):
    """The master found through Sentinel; closing it also closes the connections to
    the sentinels it asked, which redis-py leaves open (one per sentinel, per client)."""

    def close(self) -> None:
        super().close()
        for sentinel in _sentinels(self):
            sentinel.close()


class _AsyncSentinelMaster(redis.asyncio.Redis):
    """:class:`_SentinelMaster` for the async face: without this, the sentinels'
    connections outlive the event loop they belong to."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        for sentinel in _sentinels(self):
            await sentinel.aclose()


def loop_clients(
    url: str, guarded: Callable[[str], AbstractContextManager[object]], **options: Any
) -> tuple[SyncClient, Callable[[], AsyncClient]]:
    """The sync client for ``url``, and a maker of async clients, one per event loop (a
    redis-py async client belongs to the loop that opened its connections).

    The first async client is the one built beside the sync client; each later call
    builds a new pair and keeps its async half. ``guarded("connect")`` wraps every
    connection attempt, so a store's driver errors read as its own.
    """
    with guarded("connect"):  # a Cluster client reads the slot map at once
        sync, first = redis_clients(url, **options)
    spare = [first]

    def new_async() -> AsyncClient:
        if spare:
            return spare.pop()
        with guarded("connect"):
            extra_sync, aio = redis_clients(url, **options)
        extra_sync.close()  # the bridge builds clients in pairs; one is wanted here
        return aio

    return sync, new_async


class CircuitBreaker:
    """Fails fast while Redis is unreachable, so a dead server costs no time per request.

    Opens after ``threshold`` consecutive connection failures or timeouts; after
    ``cooldown`` seconds one call goes through as a probe (half-open), and its success
    closes the breaker. A server that answers with an error (``WRONGTYPE``, ``OOM``) is
    reachable and does not count. Each transition is logged once, on the ``keyguard``
    logger, naming ``what`` ("rate store"). Thread-safe; never held across an await.

    Use: ``enter()`` before a call (raises :class:`StorageError` while open), then
    ``leave(True)`` if the server answered (even with an error), ``leave(False)`` on a
    connection error or timeout, ``leave(None)`` if the call was cancelled.

    .. versionadded:: 0.1
    """

    __slots__ = ("_failures", "_lock", "_open_until", "_probing", "cooldown", "threshold", "what")

    def __init__(self, what: str, threshold: int, cooldown: float) -> None:
        self.what, self.threshold, self.cooldown = what, threshold, cooldown
        self._lock = threading.Lock()
        self._failures = 0
        self._open_until: float | None = None
        self._probing = False

    @property
    def is_open(self) -> bool:
        return self._open_until is not None

    def enter(self) -> None:
        """Let a call through, or raise :class:`StorageError` while open."""
        if not self.is_open:  # the hot path: no lock
            return
        with self._lock:
            until = self._open_until  # read again: another thread may have closed it
            if until is None:
                return
            if self._probing or time.monotonic() < until:
                raise StorageError(f"the Redis {self.what} is unavailable (circuit open)")
            self._probing = True
            _logger.info("keyguard: probing the Redis %s (circuit half-open)", self.what)

    def leave(self, reachable: bool | None) -> None:
        """Record a call's outcome: reached the server, failed to, or unknown (cancelled)."""
        if reachable and not self._failures and self._open_until is None:
            return  # the hot path: nothing to change, no lock
        with self._lock:
            probe, self._probing = self._probing, False
            if reachable:
                if self._open_until is not None:
                    _logger.warning("keyguard: the Redis %s is back (circuit closed)", self.what)
                self._failures, self._open_until = 0, None
            elif reachable is None:
                if probe:  # a cancelled probe proved nothing: the next call probes
                    self._open_until = time.monotonic()
            elif probe:
                self._open_until = time.monotonic() + self.cooldown
            else:
                self._failures += 1
                if self._open_until is None and self._failures >= self.threshold:
                    self._open_until = time.monotonic() + self.cooldown
                    _logger.warning(
                        "keyguard: the Redis %s failed %d times in a row; failing fast "
                        "for %.3g s at a time (circuit open)",
                        self.what,
                        self._failures,
                        self.cooldown,
                    )
