"""Rate limits in Redis: exact across processes and machines, one round trip a hit.

Every hit is one ``EVALSHA`` of ``lua/admit.lua``, which reads the server's ``TIME``
(never this process's clock, so hosts whose clocks disagree still agree on windows,
T74), checks every window, quota and the concurrency slot with the arithmetic of
:mod:`keyguard.windows`, and charges all of them or none. A bucket lives in three keys
that share one hash tag, so the script runs on Redis Cluster too::

    {kg:<bucket>}:win    hash: a field per window (its slots, binary)
    {kg:<bucket>}:quota  hash: a field per quota ("<period id>:<used>")
    {kg:<bucket>}:lease  zset: lease id -> expiry (ms)

One hash per kind, not a key per window, so :meth:`RedisRateStore.reset` knows every
key of a bucket without knowing its policy, each key is declared in ``KEYS`` (a quota's
period id comes from the server's time, which the client does not know) and a hit
reads each hash with one ``HMGET``. Every key written gets a TTL, so idle buckets
expire on their own; a refusal writes only what expiry changed, as the other backends.

Releases from the async face do not wait for Redis: a released lease rides on the
bucket's next script call from the same store (the script counts it out, then removes
it), or is flushed with every other pending release in one pipelined round trip
``release_delay`` seconds later (see :meth:`RedisRateStore.arelease`). Settling
reserved units (:meth:`RedisRateStore.adjust`) is one ``EVALSHA`` of ``lua/adjust.lua``
on the bucket's quota hash.

Failures: every redis-py error becomes :class:`~keyguard.errors.StorageError` (the
message names the action, never the bucket), and nothing is retried -- a retry after a
timed-out reply could charge twice -- except ``NOSCRIPT`` (the script did not run),
answered by one ``EVAL`` that also caches the script again. A circuit breaker makes a
dead server cost nothing per request: after ``failure_threshold`` consecutive
connection failures or timeouts it fails fast for ``recovery_time`` seconds, then lets
one probe through.

The async face's script calls (``ahit``, ``apeek``) on a single server go over a
pipelined connection of the store's own (:mod:`._resp`): pre-encoded, many concurrent
calls in one write, replies matched to calls by the connection, in order, so a call
cancelled mid-command never leaves its reply for the next caller; a timed-out
connection is aborted, never reused. Everything else, and Sentinel and Cluster, use
redis-py, whose asyncio client (>= 4.5.5) disconnects a connection whose read or
write was interrupted (CVE-2023-28858). The tests check both.

.. versionadded:: 0.1
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import struct
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from importlib.resources import files
from typing import Any, ClassVar, Final, NamedTuple, TypeAlias, TypeVar

import redis
import redis.asyncio.cluster
from redis.exceptions import NoScriptError, RedisClusterException, ResponseError

from .._state import period_named
from ..clock import Clock
from ..errors import ConfigurationError, StorageError, shown
from ..limiting import (
    Adjustment,
    Admission,
    HitRequest,
    LimitKind,
    LimitPolicy,
    LimitState,
    QuotaPeriod,
)
from ..windows import DEFAULT_LEASE_TTL, DEFAULT_SLOTS, Tuning
from ._redis_client import AsyncClient, CircuitBreaker, SyncClient, redis_clients
from ._resp import Pipe, bulk, pipe_for

__all__ = ["ADMIT_SCRIPT", "RedisRateStore"]


class _Script(NamedTuple):
    source: str
    sha: str


def _script(name: str) -> _Script:
    source = files(__package__).joinpath("lua", name).read_text("utf-8")
    return _Script(source, hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest())


_ADMIT: Final = _script("admit.lua")
_ADJUST: Final = _script("adjust.lua")
ADMIT_SCRIPT: Final = _ADMIT.source
_WINDOW, _QUOTA, _SLOTS = LimitKind.WINDOW, LimitKind.QUOTA, LimitKind.CONCURRENCY
_PERIOD_CODES: Final = {QuotaPeriod.DAY: 1, QuotaPeriod.MONTH: 2}  # admit.lua's
_PREFIX = re.compile(r"[A-Za-z0-9_.:-]{1,64}")  # no braces: the prefix sits in a hash tag
_MAX_PLANS = 4096
_MAX_BUCKETS = 4096  # buckets whose keys are kept encoded
# A test clock is not the server's, so keys written on its time live this much longer
# in real time (a slow test must not see them expire under it).
_TEST_TTL_PAD_MS = 600_000
_ALLOWED = Admission(True, ())
# The admission command's fixed parts, as RESP (see RedisRateStore._packed).
_EVALSHA = bulk(b"EVALSHA") + bulk(_ADMIT.sha.encode())
_EVAL = bulk(b"EVAL") + bulk(_ADMIT.source.encode())
_HIT, _PEEK = bulk(b"hit"), bulk(b"peek")
_SERVER_TIME = bulk(b"") * 2  # t_ms and wall_us: "" -> the script reads TIME
_NO_LEASE = bulk(b"")
_COSTS = tuple(bulk(b"%d" % cost) for cost in range(64))  # a hit's usual costs, encoded
DEFAULT_RELEASE_DELAY = 0.01  # seconds an async release may wait to ride on another call
_MAX_RELEASED = 256  # releases of one bucket carried by one call, at most
_logger = logging.getLogger("keyguard")
_FAILED = (redis.RedisError, RedisClusterException)
_new = tuple.__new__  # builds a named tuple at half the cost of calling its class
T = TypeVar("T")
Operands: TypeAlias = list[bytes | str | int]  # of EVALSHA, after the sha


class _Plan:
    """A policy, with the store's lease settings, as the script's arguments, and how to
    read its reply back.

    The numbers go as one binary argument (little-endian doubles, which hold every
    integer up to 2**53 exactly): the script reads them with one ``struct.unpack``,
    where ``tonumber`` would run ``strtod`` on each (a twentieth of the script's time).
    The field names follow as arguments of their own. ``packed`` is all of it as RESP:
    the part of a hit's command that never changes, encoded once.
    """

    __slots__ = ("args", "cap", "items", "packed", "shown")

    def __init__(self, policy: LimitPolicy, slots: int, lease_ms: int, pad_ms: int) -> None:
        if any(w.seconds < 1 for w in policy.windows):
            raise ValueError("a window must last at least one second")
        # "b": binary slots (admit.lua); earlier msgpack fields are not read, and expire.
        counters = {f"b{w.seconds}:{w.scope}": w.seconds for w in policy.windows}
        index = {key: n for n, key in enumerate(counters, 1)}
        periods = {f"{q.period.value}:{q.scope}": q.period for q in policy.quotas}
        quotas = list(periods)
        self.cap = policy.concurrency
        numbers: list[int] = [lease_ms, pad_ms, -1 if self.cap is None else self.cap]
        # Each list whole, then the next (admit.lua reads a list with one unpack).
        numbers.append(len(counters))
        numbers += [seconds * 1000 for seconds in counters.values()]
        numbers += [max(1, seconds // slots) * 1000 for seconds in counters.values()]
        numbers.append(len(policy.windows))
        numbers += [index[f"b{w.seconds}:{w.scope}"] for w in policy.windows]
        numbers += [w.limit for w in policy.windows]
        numbers.append(len(quotas))
        numbers += [_PERIOD_CODES[period] for period in periods.values()]
        numbers.append(len(policy.quotas))
        numbers += [quotas.index(f"{q.period.value}:{q.scope}") + 1 for q in policy.quotas]
        numbers += [q.limit for q in policy.quotas]
        blob = struct.pack(f"<{len(numbers)}d", *numbers)
        names = (*counters, *quotas)
        self.args: tuple[bytes | str, ...] = (blob, *names)
        self.packed = bulk(blob) + b"".join(bulk(name.encode()) for name in names)
        # EVALSHA, sha, numkeys, 3 keys, 5 per-call arguments, then the plan's
        self.items = 11 + len(self.args)
        self.shown = (
            *((w.name, _WINDOW, w.limit, w.seconds) for w in policy.windows),
            *((q.name, _QUOTA, q.limit, None) for q in policy.quotas),
            *((("concurrency", _SLOTS, self.cap, None),) if self.cap is not None else ()),
        )

    def states(self, reply: Sequence[int]) -> tuple[LimitState, ...]:
        """The limits' states from the script's reply (after its three leading values)."""
        out, j = [], 3
        for name, kind, limit, seconds in self.shown:
            remaining, reset, length = reply[j], reply[j + 1] / 1000, seconds
            if kind is _QUOTA:
                length, j = reply[j + 2], j + 3
            else:
                j += 2
            out.append(_new(LimitState, (name, kind, limit, remaining, reset, length)))
        return tuple(out)


class RedisRateStore:
    """A :class:`~keyguard.limiting.RateStore` and ``AsyncRateStore`` in Redis.

    :param client: a sync client (``redis.Redis`` or ``redis.cluster.RedisCluster``).
    :param aclient: an async client on the same server, used from one event loop.
        Build both with :meth:`from_url`, which sets short timeouts and no retries.
    :param prefix: the first part of every key's hash tag (``{kg:<bucket>}``).
    :param lease_ttl: seconds a concurrency slot is held if never released.
    :param slots: slots per window (precision against memory).
    :param failure_threshold: consecutive connection failures that open the breaker.
    :param recovery_time: seconds the open breaker fails fast before one probe.
    :param release_delay: seconds an async release may wait to ride on the bucket's
        next call before it is flushed on its own (0 to 1).
    :param clock: **tests only**: windows and quotas follow this clock's wall time,
        passed to the script, instead of the server's ``TIME``. Production leaves it
        ``None``: app hosts' clocks disagree, the server's is one clock for all.

    **Security note**: anyone who can write to the Redis database can reset or exhaust
    any key's limits; give keyguard its own database or ACL user and key ``prefix``.

    .. versionadded:: 0.1
    """

    # ``arelease`` only queues (see there) and never suspends: the ASGI adapter awaits
    # it directly, with no task and shield around it.
    queues_releases: ClassVar[bool] = True

    def __init__(
        self,
        client: SyncClient,
        aclient: AsyncClient,
        *,
        prefix: str = "kg",
        lease_ttl: float = DEFAULT_LEASE_TTL,
        slots: int = DEFAULT_SLOTS,
        failure_threshold: int = 5,
        recovery_time: float = 0.5,
        release_delay: float = DEFAULT_RELEASE_DELAY,
        clock: Clock | None = None,
    ) -> None:
        if not isinstance(prefix, str) or not _PREFIX.fullmatch(prefix):
            raise ConfigurationError(
                f"prefix must match [A-Za-z0-9_.:-]{{1,64}}, not {shown(prefix)}"
            )
        threshold, cooldown = failure_threshold, recovery_time
        if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
            raise ConfigurationError(f"failure_threshold must be >= 1, not {shown(threshold)}")
        if (
            isinstance(cooldown, bool)
            or not isinstance(cooldown, int | float)
            or not (0 < cooldown <= 3600)
        ):
            raise ConfigurationError(
                f"recovery_time must be seconds in (0, 3600], not {shown(cooldown)}"
            )
        self._client, self._aclient = client, aclient
        # redis-py's async Cluster client misroutes (and then drops the connections of)
        # commands issued concurrently before it has read the slot map: read it first.
        self._unmapped = isinstance(aclient, redis.asyncio.cluster.RedisCluster)
        self._tag = "{" + prefix + ":"
        self._tuning = Tuning(slots, lease_ttl)
        self._clock = clock
        self._pad_ms = 0 if clock is None else _TEST_TTL_PAD_MS
        self._pad = str(self._pad_ms)
        self._breaker = CircuitBreaker("rate store", threshold, float(cooldown))
        self._plans: dict[int, tuple[LimitPolicy, _Plan]] = {}
        # The async face's hot path: the script's command pre-packed, on a pipelined
        # connection of its own (``_resp``), for single servers; else redis-py.
        self._pipe: Pipe | None = pipe_for(aclient)
        # For the guard (keyguard._guard_ops.Hit): on the pipe, an admission whose
        # caller is cancelled after it was sent still gets its reply, and a slot it
        # took is given back (see _orphaned): the caller needs no task and shield.
        self.cancel_safe = self._pipe is not None
        self._bucket_keys: dict[str, bytes] = {}
        self._closed = False
        if (
            isinstance(release_delay, bool)
            or not isinstance(release_delay, int | float)
            or not (0 <= release_delay <= 1)
        ):
            raise ConfigurationError(
                f"release_delay must be seconds in [0, 1], not {shown(release_delay)}"
            )
        self._release_delay = float(release_delay)
        # Releases from the async face wait here, by bucket, for the next admission of
        # their bucket or the flush, whichever comes first (see arelease).
        self._pending: dict[str, list[str]] = {}
        self._flush_timer: asyncio.TimerHandle | None = None
        self._flushes: set[asyncio.Task[None]] = set()

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = "kg",
        lease_ttl: float = DEFAULT_LEASE_TTL,
        slots: int = DEFAULT_SLOTS,
        failure_threshold: int = 5,
        recovery_time: float = 0.5,
        release_delay: float = DEFAULT_RELEASE_DELAY,
        clock: Clock | None = None,
        **client_options: Any,
    ) -> RedisRateStore:
        """``redis://``, ``rediss://``, ``redis+sentinel://`` or ``redis+cluster://``.

        ``client_options`` (``socket_timeout``, ``max_connections``, ...) go to
        :func:`~keyguard.backends._redis_client.redis_clients`. Nothing connects yet,
        except that a Cluster's sync client reads the slot map (``StorageError`` if no
        node answers).
        """
        client, aclient = redis_clients(url, **client_options)
        return cls(
            client,
            aclient,
            prefix=prefix,
            lease_ttl=lease_ttl,
            slots=slots,
            failure_threshold=failure_threshold,
            recovery_time=recovery_time,
            release_delay=release_delay,
            clock=clock,
        )

    def __repr__(self) -> str:
        state = "open" if self._breaker.is_open else "closed"
        return f"RedisRateStore(prefix={self._tag[1:-1]!r}, circuit={state})"

    # the script's arguments

    def _plan(self, policy: LimitPolicy) -> _Plan:
        found = self._plans.get(id(policy))
        if found is not None and found[0] is policy:
            return found[1]
        plan = _Plan(policy, self._tuning.slots, self._tuning.lease_ms, self._pad_ms)
        if len(self._plans) >= _MAX_PLANS:
            self._plans.clear()
        self._plans[id(policy)] = (policy, plan)
        return plan

    def _keys(self, bucket: str) -> tuple[str, str, str]:
        tag = self._tag + bucket
        return tag + "}:win", tag + "}:quota", tag + "}:lease"

    def _call(
        self,
        mode: str,
        bucket: str,
        plan: _Plan,
        cost: int = 0,
        lease: str | None = None,
        *,
        released: Sequence[str] = (),
    ) -> Operands:
        """``EVALSHA``'s operands after the sha: numkeys, keys, then the arguments."""
        if self._clock is None:
            t = wall = ""
        else:
            now = self._clock.now()
            t, wall = str(round(now * 1000)), str(round(now * 1_000_000))
        mark = "" if lease is None else "=" + lease
        head: Operands = [mode, t, wall, cost, mark]
        # Each lease once: the script counts every one it is given out of the slots held.
        return [3, *self._keys(bucket), *head, *plan.args, *dict.fromkeys(released)]

    def _hit_plan(self, request: HitRequest) -> _Plan:
        plan = self._plan(request.policy)
        cost = request.cost
        if isinstance(cost, bool) or not isinstance(cost, int) or cost < 0:
            raise ValueError("a hit's cost must be a whole number >= 0")
        if plan.cap is not None and request.lease is None:
            raise ValueError("a policy with a concurrency cap needs a lease id on each hit")
        return plan

    def _hit_call(
        self, request: HitRequest, released: Sequence[str] = ()
    ) -> tuple[_Plan, Operands]:
        plan = self._hit_plan(request)
        cost, lease = request.cost, request.lease
        return plan, self._call("hit", request.bucket, plan, cost, lease, released=released)

    def _packed(
        self,
        mode: bytes,
        bucket: str,
        plan: _Plan,
        cost: int = 0,
        lease: str | None = None,
        *,
        released: Sequence[str] = (),
    ) -> tuple[int, bytes]:
        """:meth:`_call`'s operands as RESP: how many items the whole command has, and
        its bytes after ``EVALSHA <sha>`` (or ``EVAL <source>``)."""
        keys = self._bucket_keys.get(bucket)
        if keys is None:
            keys = bulk(b"3") + b"".join(bulk(key.encode()) for key in self._keys(bucket))
            if len(self._bucket_keys) >= _MAX_BUCKETS:
                self._bucket_keys.clear()
            self._bucket_keys[bucket] = keys
        if self._clock is None:
            times = _SERVER_TIME
        else:
            now = self._clock.now()
            times = bulk(b"%d" % round(now * 1000)) + bulk(b"%d" % round(now * 1_000_000))
        if lease is None:
            mark = _NO_LEASE
        else:
            lease_b = lease.encode()
            mark = b"$%d\r\n=%b\r\n" % (len(lease_b) + 1, lease_b)
        cost_b = _COSTS[cost] if 0 <= cost < len(_COSTS) else bulk(b"%d" % cost)
        if not released:
            return plan.items, b"".join((keys, mode, times, cost_b, mark, plan.packed))
        if len(released) == 1:  # the usual case: the bucket's last request gave its slot back
            tail = bulk(released[0].encode())
            return plan.items + 1, b"".join((keys, mode, times, cost_b, mark, plan.packed, tail))
        leases = dict.fromkeys(released)  # each once, as _call
        tail = b"".join([bulk(x.encode()) for x in leases])
        return plan.items + len(leases), b"".join(
            (keys, mode, times, cost_b, mark, plan.packed, tail)
        )

    @staticmethod
    def _admission(plan: _Plan, reply: Sequence[int]) -> Admission:
        states = plan.states(reply)
        if reply[0] == 1:
            return _new(Admission, (True, states, None, None))
        retry = None if reply[1] < 0 else reply[1] / 1000
        return Admission(False, states, states[reply[2] - 1], retry)

    # one guarded round trip, for each face

    @contextmanager
    def _guarded(self, action: str) -> Iterator[None]:
        """One round trip under the breaker: driver errors become :class:`StorageError`.

        A reply (even an error reply) proves Redis reachable; a connection error or a
        timeout proves it not; anything else (a cancellation) proves nothing.
        """
        if self._closed:
            raise StorageError("the Redis rate store is closed")
        breaker = self._breaker
        breaker.enter()
        reachable: bool | None = None
        try:
            yield
            reachable = True
        except ResponseError as exc:
            reachable = True
            raise StorageError(f"the Redis rate store could not {action}") from exc
        except _FAILED as exc:
            reachable = False
            raise StorageError(f"the Redis rate store could not {action}") from exc
        finally:
            breaker.leave(reachable)

    def _run(self, action: str, call: Callable[[], T]) -> T:
        with self._guarded(action):
            return call()

    async def _arun(self, action: str, call: Callable[[], Awaitable[T]]) -> T:
        """:meth:`_run` for the async face, which also honours a cancellation that
        redis-py lost.

        On Python 3.11, ``asyncio.wait_for`` (around redis-py's send) drops a
        cancellation that lands as the send completes (fixed in 3.12), so the command
        runs on until its reply or its timeout. The connection stays in step either
        way; what is lost is the caller's ``CancelledError``, raised here instead.
        """
        task = asyncio.current_task()
        cancels = 0 if task is None else task.cancelling()
        try:
            result = await self._aguarded(action, call)
        except StorageError:
            if task is not None and task.cancelling() > cancels:
                raise asyncio.CancelledError from None
            raise
        if task is not None and task.cancelling() > cancels:
            raise asyncio.CancelledError
        return result

    async def _aguarded(self, action: str, call: Callable[[], Awaitable[T]]) -> T:
        with self._guarded(action):
            if self._unmapped and isinstance(self._aclient, redis.asyncio.cluster.RedisCluster):
                await self._aclient.initialize()  # concurrent first callers queue on its lock
                self._unmapped = False
            return await call()

    async def _afast(
        self,
        pipe: Pipe,
        action: str,
        items: int,
        body: bytes,
        orphan: Callable[[Any], None] | None = None,
    ) -> Any:  # noqa: ANN401 - the script's reply
        """One admission script call on the pipelined connection, under the breaker, as
        :meth:`_guarded` (inlined: this is the hot path). ``NOSCRIPT`` (it did not run)
        is answered by one ``EVAL``, which caches the script again. ``orphan`` gets the
        reply if the caller is cancelled while the script is in flight."""
        if self._closed:
            raise StorageError("the Redis rate store is closed")
        breaker = self._breaker
        breaker.enter()
        reachable: bool | None = None
        head = b"*%d\r\n" % items
        try:
            try:
                reply = await pipe.execute(head + _EVALSHA + body, orphan)
            except NoScriptError:
                reply = await pipe.execute(head + _EVAL + body, orphan)
            reachable = True
        except ResponseError as exc:
            reachable = True
            raise StorageError(f"the Redis rate store could not {action}") from exc
        except _FAILED as exc:
            reachable = False
            raise StorageError(f"the Redis rate store could not {action}") from exc
        finally:
            breaker.leave(reachable)
        return reply

    def _eval(self, operands: Operands, script: _Script = _ADMIT) -> Any:  # noqa: ANN401
        client = self._client
        try:
            return client.evalsha(script.sha, *operands)  # type: ignore[arg-type]
        except NoScriptError:  # the script did not run: EVAL runs it and caches it again
            return client.eval(script.source, *operands)  # type: ignore[arg-type]

    async def _aeval(self, operands: Operands, script: _Script = _ADMIT) -> Any:  # noqa: ANN401 - the script's reply, read by its caller
        client = self._aclient
        try:
            return await client.evalsha(script.sha, *operands)  # type: ignore[arg-type]
        except NoScriptError:
            return await client.eval(script.source, *operands)  # type: ignore[arg-type]

    def _adjust_call(self, adjustment: Adjustment) -> Operands | None:
        """``adjust.lua``'s operands, or ``None`` when there is nothing to send."""
        delta = adjustment.delta
        if isinstance(delta, bool) or not isinstance(delta, int):
            raise ValueError("an adjustment's delta must be a whole number")
        args: Operands = []
        seen: set[str] = set()
        for charge in adjustment.charges if delta else ():
            field = f"{charge.period.value}:{charge.scope}"
            if field not in seen:  # quotas of one shape share a counter, moved once
                seen.add(field)
                period = period_named(charge.period, charge.period_id)
                args += [field, period.key, round(period.start), round(period.end)]
        if not args:
            return None
        wall = "" if self._clock is None else str(round(self._clock.now() * 1_000_000))
        return [1, self._keys(adjustment.bucket)[1], wall, delta, self._pad, *args]

    # sync face

    def hit(self, request: HitRequest) -> Admission:
        if request.policy.is_empty():
            return _ALLOWED
        plan, operands = self._hit_call(request)
        reply = self._run("count a hit", lambda: self._eval(operands))
        return self._admission(plan, reply)

    def release(self, bucket: str, lease: str) -> None:
        key = self._keys(bucket)[2]
        self._run("release a slot", lambda: self._client.zrem(key, lease))

    def peek(self, bucket: str, policy: LimitPolicy) -> Sequence[LimitState]:
        if policy.is_empty():
            return ()
        plan = self._plan(policy)
        operands = self._call("peek", bucket, plan)
        return plan.states(self._run("read a bucket", lambda: self._eval(operands)))

    def adjust(self, adjustment: Adjustment) -> None:
        """Settle quota counters: one ``EVALSHA`` of ``lua/adjust.lua``, one round trip.

        Not retried, like a hit: a retry after a timed-out reply could refund twice.
        """
        operands = self._adjust_call(adjustment)
        if operands is not None:
            self._run("adjust a quota", lambda: self._eval(operands, _ADJUST))

    def eviction_policy(self) -> str | None:
        """The server's ``maxmemory-policy``, or ``None`` when it cannot be read.

        Under an ``allkeys-*`` policy Redis may evict live counters, which silently
        resets limits; callers warn about it at start-up. ACLs and managed services
        often refuse ``CONFIG``, and a Cluster answers per node: both give ``None``.
        """
        try:
            with self._guarded("read the eviction policy"):
                # redis-py types the reply as str, but without decode_responses it is bytes.
                reply: object = self._client.config_get("maxmemory-policy")
        except StorageError:
            return None
        value: object = None
        if isinstance(reply, dict):
            value = reply.get("maxmemory-policy", reply.get(b"maxmemory-policy"))
        if isinstance(value, bytes):
            value = value.decode("ascii", "replace")
        return value if isinstance(value, str) else None

    def reset(self, bucket: str) -> None:
        keys = self._keys(bucket)
        self._run("reset a bucket", lambda: self._client.delete(*keys))

    def close(self) -> None:
        """Close the sync client's connections; later calls raise :class:`StorageError`."""
        self._closed = True
        self._client.close()

    # async face

    async def ahit(self, request: HitRequest) -> Admission:
        if request.policy.is_empty():
            return _ALLOWED
        bucket = request.bucket
        released = self._pending.pop(bucket, None) if self._pending else None
        pipe = self._pipe
        try:
            if pipe is not None:
                plan = self._hit_plan(request)
                items, body = self._packed(
                    _HIT, bucket, plan, request.cost, request.lease, released=released or ()
                )
                lease = request.lease
                orphan = None if lease is None else partial(self._orphaned, plan, bucket, lease)
                reply = await self._afast(pipe, "count a hit", items, body, orphan)
            else:
                plan, operands = self._hit_call(request, released or ())
                reply = await self._arun("count a hit", lambda: self._aeval(operands))
        except BaseException:
            self._requeue(bucket, released)
            raise
        return self._admission(plan, reply)

    async def arelease(self, bucket: str, lease: str) -> None:
        """Give a slot back without waiting for Redis: the release rides on the next
        admission (or peek) of ``bucket`` from this store, or is flushed with every other
        pending release in one pipelined round trip ``release_delay`` seconds later,
        whichever comes first.

        So the response does not wait for a round trip, and this process's next hit on
        the bucket always sees the slot free; another process sees it free up to
        ``release_delay`` later than it would otherwise. ``ZREM`` is idempotent, so a
        release carried twice is harmless; one that cannot be sent (Redis down) is
        logged, and the lease expiry gives the slot back (the crash backstop too).
        """
        if self._closed:
            raise StorageError("the Redis rate store is closed")
        self._queue_release(bucket, lease)

    def _orphaned(self, plan: _Plan, bucket: str, lease: str, reply: Any) -> None:  # noqa: ANN401 - the script's reply
        """The reply of an admission whose caller was cancelled: a slot it took goes
        back, as a release would (T82). An error reply took nothing."""
        if isinstance(reply, Exception) or self._closed:
            return
        try:
            admitted = self._admission(plan, reply).allowed
        except (TypeError, ValueError, IndexError):  # pragma: no cover - a damaged reply
            return  # the lease expiry gives the slot back
        if admitted:
            self._queue_release(bucket, lease)

    def _queue_release(self, bucket: str, lease: str) -> None:
        leases = self._pending.setdefault(bucket, [])
        leases.append(lease)
        if self._flush_timer is None or len(leases) >= _MAX_RELEASED:
            if self._flush_timer is not None:
                self._flush_timer.cancel()
            delay = self._release_delay if len(leases) < _MAX_RELEASED else 0.0
            self._flush_timer = asyncio.get_running_loop().call_later(delay, self._flush_soon)

    def _requeue(self, bucket: str, released: list[str] | None) -> None:
        """Put back releases a failed call carried (sent again by the flush, at worst
        after they already applied: ZREM is idempotent)."""
        if released:
            self._pending.setdefault(bucket, []).extend(released)
            if self._flush_timer is None and not self._closed:
                loop = asyncio.get_running_loop()
                self._flush_timer = loop.call_later(self._release_delay, self._flush_soon)

    def _flush_soon(self) -> None:
        self._flush_timer = None
        if self._pending:
            task = asyncio.get_running_loop().create_task(self._aflush())
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)

    async def _aflush(self) -> None:
        """Send every pending release: one pipeline, one round trip (per node)."""
        pending, self._pending = self._pending, {}
        if not pending:
            return
        keys = self._keys

        async def send() -> None:
            async with self._aclient.pipeline(transaction=False) as pipe:
                for bucket, leases in pending.items():
                    pipe.zrem(keys(bucket)[2], *leases)
                await pipe.execute()

        try:
            await self._arun("release slots", send)
        except StorageError as exc:  # the type only: a message may name a bucket
            count = sum(len(leases) for leases in pending.values())
            _logger.warning(
                "keyguard could not release %d concurrency slots (%s); their leases expire",
                count,
                type(exc).__name__,
            )

    async def apeek(self, bucket: str, policy: LimitPolicy) -> Sequence[LimitState]:
        if policy.is_empty():
            return ()
        plan = self._plan(policy)
        released = self._pending.pop(bucket, None) if self._pending else None
        pipe = self._pipe
        try:
            if pipe is not None:
                items, body = self._packed(_PEEK, bucket, plan, released=released or ())
                reply = await self._afast(pipe, "read a bucket", items, body)
            else:
                operands = self._call("peek", bucket, plan, released=released or ())
                reply = await self._arun("read a bucket", lambda: self._aeval(operands))
        except BaseException:
            self._requeue(bucket, released)
            raise
        return plan.states(reply)

    async def aadjust(self, adjustment: Adjustment) -> None:
        operands = self._adjust_call(adjustment)
        if operands is not None:
            await self._arun("adjust a quota", lambda: self._aeval(operands, _ADJUST))

    async def areset(self, bucket: str) -> None:
        keys = self._keys(bucket)
        self._pending.pop(bucket, None)  # the slots go with the bucket
        await self._arun("reset a bucket", lambda: self._aclient.delete(*keys))

    async def aclose(self) -> None:
        """Send the pending releases, then close both clients' connections; later calls
        raise :class:`StorageError`."""
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        await self._aflush()
        if self._flushes:
            await asyncio.gather(*self._flushes, return_exceptions=True)
        self._closed = True
        if self._pipe is not None:
            await self._pipe.aclose()
        await self._aclient.aclose()
        self._client.close()
