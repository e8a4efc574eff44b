"""The rate store's pipelined connection (``backends/_resp.py``), against scripted servers.

A :class:`FakeRedis` answers each command as a test scripts it -- split into single
bytes, late, never, with an error, with garbage, or by hanging up -- so the client's
handling of partial reads, timeouts, cancellation mid-reply, connection loss, error
replies and TLS is checked byte for byte. The real-server cases (``NOSCRIPT``,
keepalive, many loops) run on a throwaway ``redis-server``.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import redis
import redis.asyncio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hiredis import Reader
from redis.exceptions import (
    AuthenticationError,
    BusyLoadingError,
    NoPermissionError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
)

from keyguard.backends._redis_client import KEEPALIVE, redis_clients
from keyguard.backends._resp import Pipe, command, pipe_for, reply_error
from keyguard.backends.redis_limiter import RedisRateStore
from keyguard.guard import Allow, Guard
from keyguard.limiting import HitRequest, LimitPolicy, Window
from keyguard.plans import Plan
from keyguard.request import RequestInfo
from keyguard.testing import memory_guard
from tests import redis_support
from tests.redis_support import RedisServer

own_redis = redis_support.own_redis
Answer = Callable[[list[bytes], asyncio.StreamWriter], Awaitable[None]]


class FakeRedis:
    """A RESP server on loopback whose every answer a test scripts with ``answer``.

    Records each connection and each command (``commands``); ``answer(args, writer)``
    writes whatever reply it likes (the default: ``+OK``)."""

    def __init__(self, answer: Answer | None = None) -> None:
        self.answer = answer or ok
        self.commands: list[list[bytes]] = []
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self, context: ssl.SSLContext | None = None) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=context)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        parser = Reader()
        try:
            while data := await reader.read(65536):
                parser.feed(data)
                while (request := parser.gets()) is not False:
                    self.commands.append(request)
                    await self.answer(request, writer)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def ok(args: list[bytes], writer: asyncio.StreamWriter) -> None:
    writer.write(b"+OK\r\n")


async def echo(args: list[bytes], writer: asyncio.StreamWriter) -> None:
    """``ECHO x``-like: replies with the command's last argument."""
    writer.write(b"$%d\r\n%b\r\n" % (len(args[-1]), args[-1]))


@pytest.fixture
async def fake() -> AsyncIterator[FakeRedis]:
    server = FakeRedis()
    await server.start()
    try:
        yield server
    finally:
        await server.close()


def pipe(url: str, **options: object) -> Pipe:
    _, aclient = redis_clients(url, **options)  # type: ignore[arg-type]
    found = pipe_for(aclient)
    assert found is not None
    return found


# -- replies --------------------------------------------------------------------------


async def test_replies_split_into_single_bytes_are_read_whole(fake: FakeRedis) -> None:
    """A reply that arrives a byte at a time, and many replies in one packet, each
    reach their own caller, in order."""

    async def trickle(args: list[bytes], writer: asyncio.StreamWriter) -> None:
        reply = b"*3\r\n:1\r\n$%d\r\n%b\r\n:-7\r\n" % (len(args[-1]), args[-1])
        for byte in reply:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0)

    fake.answer = trickle
    client = pipe(f"redis://127.0.0.1:{fake.port}", socket_timeout=5)
    replies = await asyncio.gather(*(client.execute(command("X", f"v{n}")) for n in range(20)))
    assert replies == [[1, f"v{n}".encode(), -7] for n in range(20)]
    await client.aclose()


async def test_concurrent_commands_share_one_connection_and_one_write(fake: FakeRedis) -> None:
    """Commands sent while one is in flight go out together, on the same connection,
    and every reply comes back to its own caller."""
    client = pipe(f"redis://127.0.0.1:{fake.port}", socket_timeout=5)
    fake.answer = echo
    assert await client.execute(command("ECHO", "first")) == b"first"
    replies = await asyncio.gather(*(client.execute(command("ECHO", str(n))) for n in range(100)))
    assert replies == [str(n).encode() for n in range(100)]
    assert fake.connections == 1
    await client.aclose()


async def test_error_replies_raise_redis_py_errors_and_keep_the_connection(
    fake: FakeRedis,
) -> None:
    """NOSCRIPT, OOM and other error replies raise redis-py's own exception classes;
    the connection stays in step for the next command."""
    errors = iter([b"-NOSCRIPT No matching script\r\n", b"-OOM command not allowed\r\n",
                   b"-WRONGTYPE Operation against a key\r\n"])  # fmt: skip

    async def answer(args: list[bytes], writer: asyncio.StreamWriter) -> None:
        writer.write(next(errors, b"+PONG\r\n"))

    fake.answer = answer
    client = pipe(f"redis://127.0.0.1:{fake.port}", socket_timeout=5)
    for kind in (NoScriptError, OutOfMemoryError, ResponseError):
        with pytest.raises(kind):
            await client.execute(command("EVALSHA", "x", 0))
    assert await client.execute(command("PING")) == b"PONG"
    assert fake.connections == 1
    await client.aclose()


@pytest.mark.parametrize(
    ("reply", "kind", "message"),
    [
        ("NOSCRIPT No matching script.", NoScriptError, "No matching script."),
        ("OOM command not allowed", OutOfMemoryError, "command not allowed"),
        ("READONLY You can't write", ReadOnlyError, "You can't write"),
        ("NOPERM no permissions", NoPermissionError, "no permissions"),
        ("LOADING Redis is loading", BusyLoadingError, "Redis is loading"),
        ("NOAUTH Authentication required.", AuthenticationError, "Authentication required."),
        ("WRONGTYPE Operation against a key", ResponseError, "WRONGTYPE Operation against a key"),
        ("ERR unknown command", ResponseError, "unknown command"),
        ("ERR invalid password", AuthenticationError, "invalid password"),
        ("NOSCRIPT", NoScriptError, ""),
    ],
)
def test_error_replies_map_to_the_classes_redis_py_gives_them(
    reply: str, kind: type[Exception], message: str
) -> None:
    """An error's first word picks redis-py's class and is cut from the message, as
    redis-py's own parser does; an unknown word keeps the whole text."""
    error = reply_error(reply)
    assert type(error) is kind
    assert str(error) == message


async def test_garbage_or_unasked_replies_discard_the_connection(fake: FakeRedis) -> None:
    """A reply that is not RESP, or one nobody asked for, fails what is in flight as a
    connection error and the connection is never reused."""
    sent = iter([b"!!not resp\r\n", b"+OK\r\n+EXTRA\r\n"])

    async def answer(args: list[bytes], writer: asyncio.StreamWriter) -> None:
        writer.write(next(sent, b"+OK\r\n"))

    fake.answer = answer
    client = pipe(f"redis://127.0.0.1:{fake.port}", socket_timeout=5)
    with pytest.raises(redis.ConnectionError):
        await client.execute(command("PING"))
    assert await client.execute(command("PING")) == b"OK"  # the extra reply follows it
    await asyncio.sleep(0.05)
    assert await client.execute(command("PING")) == b"OK"
    assert fake.connections == 3
    await client.aclose()


# -- timeouts, cancellation, loss -------------------------------------------------------


async def test_a_timeout_fails_every_command_in_flight_and_discards_the_connection(
    fake: FakeRedis,
) -> None:
    """A server that stops answering: every command in flight fails with a redis-py
    TimeoutError within the timeout, nothing is re-sent, and the next command runs on a
    new connection."""
    silent = asyncio.Event()

    async def answer(args: list[bytes], writer: asyncio.StreamWriter) -> None:
        if not silent.is_set():
            writer.write(b"+OK\r\n")

    fake.answer = answer
    client = pipe(f"redis://127.0.0.1:{fake.port}", socket_timeout=0.1)
    await client.execute(command("PING"))
    silent.set()
    loop = asyncio.get_running_loop()
    start = loop.time()
    results = await asyncio.gather(
        *(client.execute(command("EVALSHA", n)) for n in range(10)), return_exceptions=True
    )
    assert all(isinstance(r, redis.TimeoutError) for r in results)
    assert loop.time() - start < 0.1 + 0.3
    assert len(fake.commands) == 11  # sent once each, never again
    silent.clear()
    assert await client.execute(command("PING")) == b"OK"
    assert fake.connections == 2
    await client.aclose()


async def test_a_caller_cancelled_mid_reply_never_hands_its_reply_to_the_next(
    fake: FakeRedis,
) -> None:
    """Callers cancelled before their command is written, while it runs, and halfway
    through its reply: each later caller gets its own reply, on the same connection."""
    gate = asyncio.Event()

    async def answer(args: list[bytes], writer: asyncio.StreamWriter) -> None:
        reply = b"$%d\r\n%b\r\n" % (len(args[-1]), args[-1])
        if args[-1].startswith(b"slow"):
            writer.write(reply[:3])
            await writer.drain()
            await gate.wait()
            reply = reply[3:]
        writer.write(reply)

    fake.answer = answer
    client = pipe(f"redis://127.0.0.1:{fake.port}", socket_timeout=5)
    assert await client.execute(command("ECHO", "warm")) == b"warm"
    for n in range(30):
        gate.clear()
        slow = asyncio.ensure_future(client.execute(command("ECHO", f"slow{n}")))
        for _ in range(n % 5):
            await asyncio.sleep(0)
        slow.cancel()
        mine = asyncio.ensure_future(client.execute(command("ECHO", f"mine{n}")))
        await asyncio.sleep(0.001)
        gate.set()
        assert await mine == f"mine{n}".encode()
        with pytest.raises(asyncio.CancelledError):
            await slow
    assert fake.connections == 1
    await client.aclose()


async def test_an_orphaned_reply_goes_to_whoever_adopted_it(fake: FakeRedis) -> None:
    """A caller cancelled after its command was sent hands the reply to its ``orphan``
    (the command may have taken something to give back); one cancelled before its
    command was sent hands nothing, and neither reaches the next caller."""
    gate = asyncio.Event()

    async def answer(args: list[bytes], writer: asyncio.StreamWriter) -> None:
        if args[-1] == b"late":
            await gate.wait()
        await echo(args, writer)

    fake.answer = answer
    client = pipe(f"redis://127.0.0.1:{fake.port}", socket_timeout=5)
    assert await client.execute(command("ECHO", "warm")) == b"warm"
    orphaned: list[object] = []
    late = asyncio.ensure_future(client.execute(command("ECHO", "late"), orphaned.append))
    await asyncio.sleep(0.01)  # sent, waiting for its reply
    late.cancel()
    with pytest.raises(asyncio.CancelledError):
        await late
    gate.set()
    assert await client.execute(command("ECHO", "next")) == b"next"
    assert orphaned == [b"late"]
    assert fake.connections == 1
    await client.aclose()


async def test_t82_a_hit_cancelled_in_flight_gives_its_slot_back(own_redis: RedisServer) -> None:
    """T82 on the pipe: the guard awaits the store with no task or shield
    (``cancel_safe``), so a hit whose caller is cancelled while the script runs must
    give the slot it took back by itself."""
    store = RedisRateStore.from_url(
        own_redis.url, prefix="t82", release_delay=0.001, socket_timeout=2
    )
    capped = LimitPolicy(windows=(Window("minute", 1000, 60),), concurrency=1)
    admin = redis.Redis.from_url(own_redis.url)
    assert store.cancel_safe
    assert (await store.ahit(HitRequest("warm", capped, lease="w"))).allowed
    admin.client_pause(200)  # the next script waits in the server
    hit = asyncio.ensure_future(store.ahit(HitRequest("k", capped, lease="gone")))
    await asyncio.sleep(0.05)
    hit.cancel()
    with pytest.raises(asyncio.CancelledError):
        await hit
    deadline = asyncio.get_running_loop().time() + 5
    while (await store.apeek("k", capped))[-1].remaining != 1:
        assert asyncio.get_running_loop().time() < deadline, "the slot never came back"
        await asyncio.sleep(0.02)
    assert (await store.ahit(HitRequest("k", capped, lease="next"))).allowed
    admin.close()
    await store.aclose()


async def test_connection_lost_fails_the_commands_in_flight_then_reconnects(
    fake: FakeRedis,
) -> None:
    """A server that hangs up on a command: that command fails as a connection error,
    and the next one opens a new connection."""
    hang_up = True

    async def answer(args: list[bytes], writer: asyncio.StreamWriter) -> None:
        nonlocal hang_up
        if hang_up:
            hang_up = False
            writer.transport.abort()
        else:
            writer.write(b"+OK\r\n")

    fake.answer = answer
    client = pipe(f"redis://127.0.0.1:{fake.port}", socket_timeout=5)
    with pytest.raises(redis.ConnectionError):
        await client.execute(command("EVALSHA", "x"))
    assert await client.execute(command("PING")) == b"OK"
    assert fake.connections == 2
    await client.aclose()


async def test_refused_and_slow_connections_fail_within_the_connect_timeout() -> None:
    """Nothing listening: a connection error; a listener that never completes the TLS
    handshake: a timeout within the connect timeout."""
    port = redis_support.free_port()
    client = pipe(f"redis://127.0.0.1:{port}", socket_connect_timeout=0.1)
    with pytest.raises(redis.ConnectionError):
        await client.execute(command("PING"))
    with socket.create_server(("127.0.0.1", 0)) as mute:  # accepts (backlog), says nothing
        silent = pipe(
            f"rediss://127.0.0.1:{mute.getsockname()[1]}?ssl_cert_reqs=none",
            socket_connect_timeout=0.1,
        )
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(redis.TimeoutError):
            await silent.execute(command("PING"))
        assert loop.time() - start < 0.1 + 0.3


async def test_handshake_sends_credentials_name_and_database(fake: FakeRedis) -> None:
    """The URL's user, password and database, and client_name, go out on connect as
    redis-py sends them; an error reply to them fails the connection."""
    client = pipe(f"redis://kg:s3cret@127.0.0.1:{fake.port}/4", client_name="keyguard")
    assert await client.execute(command("PING")) == b"OK"
    assert fake.commands == [
        [b"AUTH", b"kg", b"s3cret"],
        [b"CLIENT", b"SETNAME", b"keyguard"],
        [b"SELECT", b"4"],
        [b"PING"],
    ]

    async def refuse(args: list[bytes], writer: asyncio.StreamWriter) -> None:
        writer.write(b"-WRONGPASS invalid username-password pair\r\n")

    fake.answer = refuse
    wrong = pipe(f"redis://kg:bad@127.0.0.1:{fake.port}")
    with pytest.raises(redis.AuthenticationError):
        await wrong.execute(command("PING"))
    await client.aclose()


# -- TLS --------------------------------------------------------------------------------


def _certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost, and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def test_rediss_verifies_the_server_with_redis_py_s_tls_settings(tmp_path: Path) -> None:
    """rediss:// goes over TLS with the context redis-py builds from the URL: a server
    signed by the given CA answers; without that CA the connection is refused."""
    cert, key = _certificate(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server = FakeRedis(echo)
    await server.start(context)
    try:
        trusted = pipe(f"rediss://localhost:{server.port}?ssl_ca_certs={cert}", socket_timeout=5)
        replies = await asyncio.gather(*(trusted.execute(command("ECHO", n)) for n in range(5)))
        assert replies == [str(n).encode() for n in range(5)]
        await trusted.aclose()
        untrusted = pipe(f"rediss://localhost:{server.port}", socket_timeout=5)
        with pytest.raises(redis.ConnectionError):
            await untrusted.execute(command("PING"))
    finally:
        await server.close()


# -- which clients get a pipe -------------------------------------------------------------


def test_only_plain_single_servers_get_a_pipe() -> None:
    """Sentinel, Cluster, Unix sockets and custom connection classes stay on redis-py."""
    assert pipe_for(redis_clients("redis://127.0.0.1:1")[1]) is not None
    assert pipe_for(redis_clients("rediss://127.0.0.1:1")[1]) is not None
    assert pipe_for(redis_clients("redis+sentinel://127.0.0.1:1/main")[1]) is None
    assert pipe_for(redis.asyncio.Redis(unix_socket_path="/tmp/nothing.sock")) is None

    class Counting(redis.asyncio.Connection):
        pass

    assert pipe_for(redis_clients("redis://127.0.0.1:1", connection_class=Counting)[1]) is None
    assert pipe_for(redis.Redis()) is None


# -- on a real server ----------------------------------------------------------------------


POLICY = LimitPolicy(windows=(Window("minute", 1000, 60),), concurrency=10)


async def test_noscript_reloads_once_through_the_pipe(own_redis: RedisServer) -> None:
    """After SCRIPT FLUSH an async hit costs one EVALSHA and one EVAL, then EVALSHA again."""
    store = RedisRateStore.from_url(own_redis.url, prefix="np")
    admin = redis.Redis.from_url(own_redis.url)
    assert store._pipe is not None
    assert (await store.ahit(HitRequest("k", POLICY, lease="a"))).allowed
    admin.script_flush()
    admin.config_resetstat()
    assert (await store.ahit(HitRequest("k", POLICY, lease="b"))).allowed
    assert (await store.ahit(HitRequest("k", POLICY, lease="c"))).allowed
    stats = admin.info("commandstats")
    assert (stats["cmdstat_evalsha"]["calls"], stats["cmdstat_eval"]["calls"]) == (2, 1)
    assert [s.remaining for s in await store.apeek("k", POLICY)] == [997, 7]
    admin.close()
    await store.aclose()


async def test_the_pipe_has_tcp_keepalive(own_redis: RedisServer) -> None:
    """The pipe's socket carries SO_KEEPALIVE with keyguard's short timers."""
    store = RedisRateStore.from_url(own_redis.url, prefix="ka")
    await store.ahit(HitRequest("k", POLICY, lease="a"))
    link = store._pipe._link if store._pipe is not None else None
    assert link is not None
    assert link.transport is not None
    sock = link.transport.get_extra_info("socket")
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    for option, value in KEEPALIVE.items():
        assert sock.getsockopt(socket.IPPROTO_TCP, option) == value
    await store.aclose()


def test_the_pipe_runs_on_uvloop(own_redis: RedisServer) -> None:
    """uvloop's transports derive from none of asyncio's classes: the pipe must still
    write on them (uvicorn runs on uvloop whenever it is installed)."""
    uvloop = pytest.importorskip("uvloop", reason="uvloop is not installed (dev extra)")

    async def hits() -> list[int]:
        store = RedisRateStore.from_url(own_redis.url, prefix="uv")
        try:
            async with asyncio.timeout(5):  # a pipe that never writes fails, not hangs
                admissions = await asyncio.gather(
                    *(store.ahit(HitRequest("k", POLICY, lease=str(i))) for i in range(3))
                )
            return [a.states[0].remaining for a in admissions]
        finally:
            await store.aclose()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert sorted(runner.run(hits())) == [997, 998, 999]


async def test_t82_a_guard_check_cancelled_in_flight_gives_its_slot_back(
    own_redis: RedisServer,
) -> None:
    """Through the guard, which awaits a ``cancel_safe`` store's hit directly: a check
    cancelled while its script is held in the server leaves no slot taken."""
    store = RedisRateStore.from_url(
        own_redis.url, prefix="t82g", release_delay=0.001, socket_timeout=2
    )
    guard, manager = memory_guard(plans={"capped": Plan("capped", "1000/minute", None, None, 1)})
    guard = Guard(keys=guard.backends.keys, limiter=store, plans=guard.plans)
    assert guard.backends.cancel_safe
    assert not guard.inline
    assert not guard.threaded
    key = manager.create("k", plan="capped").key.reveal()
    request = RequestInfo("GET", "/", ((b"x-api-key", key.encode()),), peer="127.0.0.1")
    admin = redis.Redis.from_url(own_redis.url)
    warm = await guard.acheck(request)
    assert isinstance(warm, Allow)
    assert warm.lease is not None
    await guard.arelease(warm.lease)
    admin.client_pause(200)
    check = asyncio.ensure_future(guard.acheck(request))
    await asyncio.sleep(0.05)
    check.cancel()
    with pytest.raises(asyncio.CancelledError):
        await check
    deadline = asyncio.get_running_loop().time() + 5
    while True:
        decision = await guard.acheck(request)
        if isinstance(decision, Allow):
            break
        assert asyncio.get_running_loop().time() < deadline, "the slot never came back"
        await asyncio.sleep(0.02)
    admin.close()
    await store.aclose()
