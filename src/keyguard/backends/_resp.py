"""A lean, pipelining asyncio client for the rate store's hot command.

redis-py's asyncio client costs about 100 µs of Python per ``EVALSHA`` of the
admission script: a pool checkout (a condition, a timeout, a ``can_read`` check), a
``wait_for`` around the send, command packing, a read loop per reply. The script's
command is the same bytes but for a few operands, so :class:`Pipe` sends it pre-packed
on one connection per event loop and reads every reply in one ``data_received``
callback, parsed by hiredis (which the ``redis`` extra installs):

* **Pipelining.** A command sent while others await their replies is queued and
  written with every other command of the same event-loop turn, in one ``write``;
  their replies are read in order, as many per ``recv`` as have arrived. One
  connection then carries any number of concurrent requests, with one system call per
  batch each way instead of two per command.
* **Always in step.** Replies are matched to their commands by order, by the
  connection itself, never by the caller. A caller cancelled while its command is in
  flight gives up its place, not the reply: the reply is read and dropped when it
  comes, so the next caller never receives it (the redis-py failure behind
  CVE-2023-28858: the caller read the reply, so a cancelled caller left it unread).
* **Timeouts.** Every command has a deadline ``timeout`` seconds after it is sent. A
  connection whose oldest command passes its deadline is aborted and every command
  on it fails with :class:`redis.exceptions.TimeoutError` -- it is never reused, and
  nothing is re-sent (the script may have run: sending it again could charge twice).
  One timer per connection checks the oldest deadline, re-armed lazily, so a command
  costs no timer of its own.
* **Connection loss** fails the commands in flight with
  :class:`redis.exceptions.ConnectionError`; the next command opens a new connection
  (bounded by ``connect_timeout``; concurrent callers share one attempt).
* **Errors** come back as redis-py's exception classes (``NoScriptError``,
  ``OutOfMemoryError``, ``NoPermissionError``...), by the error's first word as its
  own parser maps them (:func:`reply_error`; the map is ours, not redis-py's private
  parser's, so a redis-py release that moves its internals breaks nothing here).

Only plain ``redis://`` and ``rediss://`` servers are served this way (TLS with the
``ssl.SSLContext`` redis-py builds from the URL); Sentinel, Cluster, Unix sockets,
credential providers and custom connection classes stay on redis-py
(:func:`pipe_for` returns ``None``). It speaks RESP2, with ``AUTH``, ``SELECT`` and
``CLIENT SETNAME`` as redis-py sends them on connect; sockets get TCP keepalive with
the client's options.

.. versionadded:: 0.1
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import redis.asyncio
from redis import exceptions as rex
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse
from redis.exceptions import TimeoutError as RedisTimeoutError

try:
    from hiredis import Reader
except ImportError:  # pragma: no cover - the redis extra installs it
    Reader = None  # type: ignore[assignment,misc]

__all__ = ["Endpoint", "Pipe", "bulk", "command", "pipe_for", "reply_error"]

_INCOMPLETE: Any = object()  # what hiredis returns while a reply is still partial
# An error reply's first word, and the redis-py class its own parser gives it (the
# pipe serves single servers only: Cluster's MOVED and ASK never reach it).
_ERRORS: dict[str, type[rex.RedisError]] = {
    "NOSCRIPT": rex.NoScriptError,
    "OOM": rex.OutOfMemoryError,
    "READONLY": rex.ReadOnlyError,
    "NOPERM": rex.NoPermissionError,
    "LOADING": rex.BusyLoadingError,
    "EXECABORT": rex.ExecAbortError,
    "MASTERDOWN": rex.MasterDownError,
    "NOAUTH": rex.AuthenticationError,
    "WRONGPASS": rex.AuthenticationError,
    "ERR": rex.ResponseError,
}
_ERR: dict[str, type[rex.RedisError]] = {  # the ERR replies a class of their own names
    "max number of clients reached": rex.MaxClientsReachedError,
    "invalid password": rex.AuthenticationError,
}


def reply_error(text: str) -> rex.RedisError:
    """The exception for an error reply: the class its first word names (its text
    without that word), else :class:`~redis.exceptions.ResponseError` with it all."""
    code, _, rest = text.partition(" ")
    known = _ERRORS.get(code)
    if known is None:
        return rex.ResponseError(text)
    return (_ERR.get(rest) or known)(rest) if code == "ERR" else known(rest)


def bulk(value: bytes) -> bytes:
    """One RESP bulk string."""
    return b"$%d\r\n%b\r\n" % (len(value), value)


def command(*args: str | bytes | int) -> bytes:
    """A whole RESP command (used for the rare ones; the hot one is pre-packed)."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(bulk(data))
    return b"".join(parts)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where and how to connect: what redis-py would do for the same client."""

    host: str
    port: int
    ssl: ssl.SSLContext | None
    connect_timeout: float
    timeout: float
    keepalive: dict[int, int] | None  # TCP options; None: no keepalive
    handshake: tuple[bytes, ...]  # AUTH, CLIENT SETNAME, SELECT, as configured


def pipe_for(client: object) -> Pipe | None:
    """A :class:`Pipe` to the server of a single-server ``redis.asyncio.Redis``, or
    ``None`` when it is anything else (Sentinel, Cluster, a Unix socket, a custom
    connection class or credential provider, or no hiredis)."""
    if Reader is None or type(client) is not redis.asyncio.Redis:
        return None
    pool = client.connection_pool
    kind = pool.connection_class
    if kind not in (redis.asyncio.Connection, redis.asyncio.SSLConnection):
        return None
    if type(pool) not in (redis.asyncio.ConnectionPool, redis.asyncio.BlockingConnectionPool):
        return None
    conn: Any = kind(**pool.connection_kwargs)  # never connected: its settings only
    if conn.credential_provider is not None:
        return None
    timeout, connect_timeout = conn.socket_timeout, conn.socket_connect_timeout
    if not timeout or not connect_timeout:
        return None  # keyguard always sets both; an unbounded wait is not served here
    handshake: list[bytes] = []
    if conn.password is not None or conn.username is not None:
        user = conn.username
        handshake.append(
            command("AUTH", conn.password or "")
            if user is None
            else command("AUTH", user, conn.password or "")
        )
    if conn.client_name:
        handshake.append(command("CLIENT", "SETNAME", conn.client_name))
    if conn.db:
        handshake.append(command("SELECT", conn.db))
    context = conn.ssl_context.get() if kind is redis.asyncio.SSLConnection else None
    keepalive = dict(conn.socket_keepalive_options or {}) if conn.socket_keepalive else None
    endpoint = Endpoint(
        conn.host,
        int(conn.port),
        context,
        float(connect_timeout),
        float(timeout),
        keepalive,
        tuple(handshake),
    )
    return Pipe(endpoint)


class Pipe:
    """One pipelined connection per event loop to one server (see the module).

    :meth:`execute` sends one pre-packed command and returns its reply; error replies
    raise redis-py's exceptions, a timeout :class:`redis.exceptions.TimeoutError`, a
    lost or refused connection :class:`redis.exceptions.ConnectionError`.
    """

    __slots__ = ("_connecting", "_link", "endpoint")

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self._link: _Link | None = None
        self._connecting: asyncio.Task[_Link] | None = None

    async def execute(self, packed: bytes, orphan: Callable[[Any], None] | None = None) -> Any:  # noqa: ANN401 - the server's reply
        """Send ``packed``; its reply. ``orphan``, if given, receives the reply (or the
        error reply) of a command whose caller was cancelled after it was sent: what a
        caller needs when the command may have taken something it must give back."""
        link = self._link
        if link is None or link.failed is not None or link.loop is not asyncio.get_running_loop():
            link = await self._connect()
        future = link.send(packed)
        if orphan is None:
            return await future
        try:
            return await future
        except asyncio.CancelledError:
            if future.cancelled():  # the caller's cancellation, not the connection's
                link.adopt(future, orphan)
            raise

    async def aclose(self) -> None:
        """Close the connection; commands still in flight fail with ConnectionError."""
        link, self._link = self._link, None
        if link is not None and link.loop is asyncio.get_running_loop():
            link.close(RedisConnectionError("the connection was closed"))
            await asyncio.sleep(0)  # lets the transport close its socket

    async def _connect(self) -> _Link:
        loop = asyncio.get_running_loop()
        task = self._connecting
        if task is None or task.get_loop() is not loop:
            old, self._link = self._link, None
            if old is not None and old.loop is loop:
                old.close(RedisConnectionError("the connection was replaced"))
            task = loop.create_task(self._open(loop))
            task.add_done_callback(_retrieved)
            self._connecting = task
        try:
            # Shielded: one caller's cancellation must not cancel the others' connection.
            link = await asyncio.shield(task)
        finally:
            if task.done() and self._connecting is task:
                self._connecting = None
        return link

    async def _open(self, loop: asyncio.AbstractEventLoop) -> _Link:
        ep = self.endpoint
        try:
            async with asyncio.timeout(ep.connect_timeout):
                _, link = await loop.create_connection(
                    lambda: _Link(loop, ep.timeout), ep.host, ep.port, ssl=ep.ssl
                )
        except TimeoutError as exc:
            raise RedisTimeoutError(f"Timeout connecting to {ep.host}:{ep.port}") from exc
        except OSError as exc:
            raise RedisConnectionError(f"Error connecting to {ep.host}:{ep.port}: {exc}") from exc
        if ep.keepalive is not None:
            link.keepalive(ep.keepalive)
        try:
            if ep.handshake:
                for reply in await asyncio.gather(*(link.send(c) for c in ep.handshake)):
                    del reply  # each is +OK; errors raised
        except BaseException:
            link.close(RedisConnectionError("the connection's handshake failed"))
            raise
        self._link = link
        return link


def _retrieved(task: asyncio.Task[_Link]) -> None:
    """A connection attempt whose every caller was cancelled: its error is not news."""
    if not task.cancelled():
        task.exception()


class _Link(asyncio.Protocol):
    """The connection: commands out in order, replies matched back in order."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self.loop = loop
        self.timeout = timeout
        self.transport: asyncio.Transport | None = None
        self.reader = Reader(
            protocolError=InvalidResponse,
            replyError=reply_error,
            notEnoughData=_INCOMPLETE,
        )
        self.waiting: deque[asyncio.Future[Any]] = deque()
        self.deadlines: deque[float] = deque()
        self.queued: list[bytes] = []
        self.failed: BaseException | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.orphans: dict[asyncio.Future[Any], Callable[[Any], None]] = {}

    # the caller's side

    def send(self, packed: bytes) -> asyncio.Future[Any]:
        """Queue ``packed``; a future of its reply."""
        if self.failed is not None:
            raise _copy(self.failed)
        future = self.loop.create_future()
        if self.waiting:  # replies are pending: go out with this turn's batch
            if not self.queued:
                self.loop.call_soon(self._flush)
            self.queued.append(packed)
        elif self.transport is not None:  # an idle connection: no one to wait for
            self.transport.write(packed)
        deadline = self.loop.time() + self.timeout
        self.waiting.append(future)
        self.deadlines.append(deadline)
        if self.timer is None:
            self.timer = self.loop.call_at(deadline, self._watch)
        return future

    def adopt(self, future: asyncio.Future[Any], orphan: Callable[[Any], None]) -> None:
        """Hand the reply of ``future``'s command, whose caller is gone, to ``orphan``."""
        if self.failed is None:
            self.orphans[future] = orphan

    def _flush(self) -> None:
        if self.queued and self.failed is None and self.transport is not None:
            data = b"".join(self.queued)
            self.queued.clear()
            self.transport.write(data)

    def _watch(self) -> None:
        """The oldest command's deadline passed, or the timer was armed for an older one."""
        self.timer = None
        if not self.deadlines or self.failed is not None:
            return
        oldest = self.deadlines[0]
        if oldest <= self.loop.time():
            self.close(RedisTimeoutError("Timeout reading from the Redis server"))
        else:
            self.timer = self.loop.call_at(oldest, self._watch)

    def keepalive(self, options: dict[int, int]) -> None:
        sock = None if self.transport is None else self.transport.get_extra_info("socket")
        if sock is None:  # pragma: no cover - TCP transports always have one
            return
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for option, value in options.items():
            sock.setsockopt(socket.IPPROTO_TCP, option, value)

    def close(self, reason: BaseException) -> None:
        """Fail every command in flight with ``reason``; abort the connection."""
        if self.failed is None:
            self.failed = reason
        self._fail_waiting()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.transport is not None:
            self.transport.abort()

    def _fail_waiting(self) -> None:
        self.orphans.clear()  # no reply will come: their commands' effects are unknown
        waiting, self.waiting = self.waiting, deque()
        self.deadlines.clear()
        self.queued.clear()
        failed = self.failed
        for future in waiting:
            if not future.done() and failed is not None:
                future.set_exception(_copy(failed))

    # the transport's side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport, but not always an asyncio.Transport subclass: uvloop's
        # TCPTransport derives from none of asyncio's classes, and an isinstance test
        # here left the connection without a transport (every command timed out).
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        waiting, deadlines = self.waiting, self.deadlines
        while True:
            try:
                reply = reader.gets()
            except InvalidResponse as exc:
                self.close(RedisConnectionError(f"the server's reply is not RESP: {exc}"))
                return
            if reply is _INCOMPLETE:
                return
            if not waiting:
                self.close(RedisConnectionError("the server sent a reply nobody asked for"))
                return
            future = waiting.popleft()
            deadlines.popleft()
            if future.done():  # its caller was cancelled: the reply is dropped here,
                if self.orphans:  # or handed to whoever adopted it
                    orphan = self.orphans.pop(future, None)
                    if orphan is not None:
                        orphan(reply)
                continue
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    def eof_received(self) -> bool:
        return False  # close: a server that stops sending is gone

    def connection_lost(self, exc: Exception | None) -> None:
        if self.failed is None:
            reason = RedisConnectionError(
                "the connection to the Redis server was lost"
                + (f": {exc}" if exc is not None else "")
            )
            self.failed = reason
        self._fail_waiting()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


def _copy(error: BaseException) -> BaseException:
    """A fresh exception of the same kind: one instance raised in many tasks would
    share (and grow) one traceback."""
    return type(error)(*error.args)
