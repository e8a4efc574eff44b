"""Throwaway redis-server processes for tests: one server, or a three-master Cluster.

Each fixture starts its own ``redis-server`` on free loopback ports (so fault tests can
kill, pause and restart it) and stops it at the end. Without the binary the tests skip
with a message saying how to install it -- except in CI (``CI=true``), where a missing
Redis is a failure, because every Redis test must run there.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

INSTALL_HINT = "redis-server not found; install it (Debian: apt-get install redis-server)"


def require_redis_binaries() -> tuple[str, str]:
    """The paths of redis-server and redis-cli, or skip (fail in CI) without them."""
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server is None or cli is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(INSTALL_HINT + " -- CI must run every Redis test")
        pytest.skip(INSTALL_HINT)
    return server, cli


def free_port(below: int = 65536) -> int:
    """A free loopback port under ``below`` (a Cluster node also needs port + 10000)."""
    for _ in range(1000):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port < below:
            return port
    raise RuntimeError("no free port found")


def _wait_for(port: int, deadline: float = 10.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"redis-server on port {port} did not start")


@dataclass
class RedisServer:
    """One redis-server process that a test may kill, pause and restart."""

    binary: str
    workdir: Path
    port: int = field(default_factory=free_port)
    extra: tuple[str, ...] = ()
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(self.workdir), "--protected-mode", "no",
            *self.extra,
        ]  # fmt: skip
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for(self.port)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None

    def pause(self) -> None:
        """SIGSTOP: the port stays open but nothing answers (a hung server)."""
        if self.process is not None:
            self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        """A fresh, empty server on the same port."""
        self.kill()
        self.start()


@dataclass
class RedisCluster:
    """Three masters, no replicas: enough to spread keys over slots."""

    nodes: list[RedisServer]

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def start_server(tmp: Path, *extra: str) -> RedisServer:
    server_bin, _ = require_redis_binaries()
    server = RedisServer(server_bin, tmp, extra=extra)
    server.start()
    return server


def start_cluster(tmp: Path) -> RedisCluster:
    server_bin, cli = require_redis_binaries()
    nodes = []
    for i in range(3):
        workdir = tmp / f"node{i}"
        workdir.mkdir()
        node = RedisServer(
            server_bin,
            workdir,
            port=free_port(below=55536),  # the cluster bus listens on port + 10000
            extra=("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"),
        )
        node.start()
        nodes.append(node)
    addresses = [f"127.0.0.1:{n.port}" for n in nodes]
    subprocess.run(
        [cli, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=30,
    )
    for node in nodes:  # every node must agree, not only the first one asked
        _wait_for_cluster(cli, node.port)
    return RedisCluster(nodes)


def _wait_for_cluster(cli: str, port: int, deadline: float = 20.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        out = subprocess.run(
            [cli, "-p", str(port), "cluster", "info"],
            check=False,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout
        if "cluster_state:ok" in out:
            return
        time.sleep(0.1)
    raise RuntimeError("the Redis cluster did not become ready")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server shared by a test session; tests flush what they use."""
    server = start_server(tmp_path_factory.mktemp("redis"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server for one test alone: fault tests kill, pause and restart it."""
    server = start_server(tmp_path)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """A three-master Redis Cluster shared by a test session."""
    cluster = start_cluster(tmp_path_factory.mktemp("cluster"))
    try:
        yield cluster
    finally:
        cluster.stop()


# -- R3: partitions -------------------------------------------------------------------

FORWARD, BLACKHOLE, DROP_UP, DROP_DOWN = "forward", "blackhole", "drop-up", "drop-down"


class PartitionProxy:
    """A TCP proxy on loopback between clients and one server, that can partition them.

    Modes (switched at any time, for every connection at once):

    * ``forward``: bytes pass both ways;
    * ``blackhole``: connections are accepted and kept, but bytes are dropped both ways
      -- no RST, no FIN: to either side the other simply stops answering, as when a
      firewall or a dead link drops packets;
    * ``drop-up`` / ``drop-down``: only client→server (requests never arrive) or only
      server→client (requests run, replies are lost) is dropped.

    A dropped byte is gone, not delayed: a client that timed out has closed its
    connection anyway, and pub/sub messages lost this way are the "invalidation lost"
    case the key cache's TTL bounds. One thread serves every connection (``select``);
    at most ``max_connections`` pairs are open (more are refused by closing them), and
    :meth:`close` stops the thread and closes every socket. The proxy records when
    each connection was accepted and when each client→server chunk arrived, so a test
    can tell how often keyguard touched the network while its breaker was open.
    """

    def __init__(self, target_port: int, *, max_connections: int = 256) -> None:
        self.target_port = target_port
        self.mode = FORWARD
        self.max_connections = max_connections
        self.accepted: list[float] = []  # time.monotonic() of each accepted connection
        self.requests: list[float] = []  # ... of each client→server chunk read
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._peer: dict[socket.socket, socket.socket] = {}
        self._upstream: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="partition-proxy", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def set_mode(self, mode: str) -> None:
        if mode not in (FORWARD, BLACKHOLE, DROP_UP, DROP_DOWN):
            raise ValueError(mode)
        self.mode = mode

    def open_connections(self) -> int:
        with self._lock:
            return len(self._upstream)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        with self._lock:
            for sock in [self._listener, *self._peer]:
                sock.close()
            self._peer.clear()
            self._upstream.clear()

    def _serve(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                watched = [self._listener, *self._peer]
            try:
                readable, _, _ = select.select(watched, [], [], 0.05)
            except (OSError, ValueError):  # a socket closed under select: look again
                continue
            for sock in readable:
                if sock is self._listener:
                    self._accept()
                else:
                    self._pump(sock)

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except OSError:
            return
        self.accepted.append(time.monotonic())
        if len(self._upstream) >= self.max_connections:
            client.close()
            return
        try:
            server = socket.create_connection(("127.0.0.1", self.target_port), timeout=1)
        except OSError:
            client.close()  # the server itself is down: as if nothing listened
            return
        for sock in (client, server):
            sock.settimeout(1)
        with self._lock:
            self._peer[client], self._peer[server] = server, client
            self._upstream.add(server)

    def _pump(self, sock: socket.socket) -> None:
        with self._lock:
            other = self._peer.get(sock)
            upstream = sock in self._upstream
        if other is None:
            return
        try:
            data = sock.recv(65536)
        except OSError:
            data = b""
        if not data:  # one side closed: close the pair, as a proxy does
            self._drop_pair(sock, other)
            return
        if not upstream:
            self.requests.append(time.monotonic())
        mode = self.mode
        dropped = mode in (BLACKHOLE, DROP_DOWN if upstream else DROP_UP)
        if dropped:
            return
        try:
            other.sendall(data)
        except OSError:
            self._drop_pair(sock, other)

    def _drop_pair(self, one: socket.socket, other: socket.socket) -> None:
        with self._lock:
            for sock in (one, other):
                self._peer.pop(sock, None)
                self._upstream.discard(sock)
                sock.close()


@pytest.fixture
def partition(own_redis: RedisServer) -> Iterator[PartitionProxy]:
    """A :class:`PartitionProxy` in front of a redis-server of the test's own."""
    proxy = PartitionProxy(own_redis.port)
    try:
        yield proxy
    finally:
        proxy.close()


# -- R3: Sentinel -----------------------------------------------------------------------

SENTINEL_SERVICE = "kgmain"


@dataclass
class SentinelProcess(RedisServer):
    """``redis-server <config> --sentinel``: a sentinel needs a config file it can rewrite."""

    monitor_port: int = 0
    down_after_ms: int = 1000
    failover_timeout_ms: int = 2000

    def start(self) -> None:
        config = self.workdir / f"sentinel-{self.port}.conf"
        if not config.exists():  # a restart keeps what the sentinel learnt
            config.write_text(
                f"port {self.port}\nbind 127.0.0.1\nprotected-mode no\ndir {self.workdir}\n"
                f"sentinel monitor {SENTINEL_SERVICE} 127.0.0.1 {self.monitor_port} 2\n"
                f"sentinel down-after-milliseconds {SENTINEL_SERVICE} {self.down_after_ms}\n"
                f"sentinel failover-timeout {SENTINEL_SERVICE} {self.failover_timeout_ms}\n"
                f"sentinel parallel-syncs {SENTINEL_SERVICE} 1\n"
            )
        args = [self.binary, str(config), "--sentinel"]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for(self.port)


@dataclass
class SentinelGroup:
    """A master, one replica and three sentinels (quorum 2), on free loopback ports."""

    master: RedisServer
    replica: RedisServer
    sentinels: list[SentinelProcess]
    cli: str

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{SENTINEL_SERVICE}"

    def ask(self, port: int, *command: str) -> str:
        """One redis-cli command against ``port``; its output ('' if it cannot answer)."""
        try:
            done = subprocess.run(
                [self.cli, "-p", str(port), *command],
                check=False,
                capture_output=True,
                text=True,
                timeout=2,
            )
        except subprocess.TimeoutExpired:
            return ""
        return done.stdout

    def master_port(self, sentinel: SentinelProcess | None = None) -> int | None:
        """The master's port as a sentinel (the first by default) reports it."""
        asked = sentinel or self.sentinels[0]
        out = self.ask(asked.port, "sentinel", "get-master-addr-by-name", SENTINEL_SERVICE)
        lines = out.split()
        return int(lines[1]) if len(lines) == 2 and lines[1].isdigit() else None

    def wait_for_master(self, port: int, deadline: float = 15.0) -> float:
        """Wait (bounded) until every sentinel names ``port`` the master; seconds it took."""
        start = time.monotonic()
        while time.monotonic() - start < deadline:
            if all(self.master_port(s) == port for s in self.sentinels):
                return time.monotonic() - start
            time.sleep(0.05)
        raise RuntimeError(f"the sentinels did not name port {port} the master")

    def stop(self) -> None:
        for process in (*self.sentinels, self.replica, self.master):
            process.stop()


def _info_field(group: SentinelGroup, port: int, section: str, name: str) -> str | None:
    for line in group.ask(port, "info", section).splitlines():
        key, _, value = line.strip().partition(":")
        if key == name:
            return value
    return None


def _wait_until(condition: Callable[[], bool], what: str, deadline: float = 15.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if condition():
            return
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


def start_sentinel_group(tmp: Path) -> SentinelGroup:
    """Start the group and wait until the sentinels know the replica and each other, so
    a failover can be agreed (quorum 2 of 3) and has a replica to promote."""
    server_bin, cli = require_redis_binaries()
    processes: list[RedisServer] = []
    try:
        master = RedisServer(server_bin, tmp, extra=("--dbfilename", "master.rdb"))
        master.start()
        processes.append(master)
        replica = RedisServer(
            server_bin,
            tmp,
            extra=("--replicaof", "127.0.0.1", str(master.port), "--dbfilename", "replica.rdb"),
        )
        replica.start()
        processes.append(replica)
        sentinels = []
        for _ in range(3):
            sentinel = SentinelProcess(server_bin, tmp, monitor_port=master.port)
            sentinel.start()
            processes.append(sentinel)
            sentinels.append(sentinel)
        group = SentinelGroup(master, replica, sentinels, cli)
        _wait_until(
            lambda: _info_field(group, replica.port, "replication", "master_link_status") == "up",
            "the replica to sync",
        )

        def agreed() -> bool:
            for s in sentinels:
                out = group.ask(s.port, "sentinel", "master", SENTINEL_SERVICE).split()
                state = dict(zip(out[::2], out[1::2], strict=False))
                if state.get("num-slaves") != "1" or state.get("num-other-sentinels") != "2":
                    return False
            return True

        _wait_until(agreed, "the sentinels to know the replica and each other")
        return group
    except BaseException:
        for process in processes:
            process.stop()
        raise


@pytest.fixture
def sentinel_group(tmp_path: Path) -> Iterator[SentinelGroup]:
    """A Sentinel-managed master and replica of the test's own (it may fail them over)."""
    group = start_sentinel_group(tmp_path)
    try:
        yield group
    finally:
        group.stop()
