"""Throwaway redis-server processes for tests: one server, or a three-master Cluster.

Each fixture starts its own ``redis-server`` on free loopback ports (so fault tests can
kill, pause and restart it) and stops it at the end. Without the binary the tests skip
with a message saying how to install it -- except in CI (``CI=true``), where a missing
Redis is a failure, because every Redis test must run there.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
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
