"""Two reference servers on one Redis share limits and revocations (the Redis issue)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from tests.redis_support import RedisServer, free_port, redis_server  # noqa: F401

from keyguard.cli import main as keyguard_cli

KEY = re.compile(r"kg_live_[0-9A-Za-z]{38}")


def _start(port: int, env: dict[str, str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "reference_app", "--port", str(port)],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_ready(port: int, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 20
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).raise_for_status()
            return
        except httpx.TransportError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise
            time.sleep(0.1)


@pytest.fixture
def servers(
    redis_server: RedisServer,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[tuple[list[int], str]]:
    """Two server processes on different ports, one Redis; the demo key the first printed."""
    prefix = f"t{free_port()}"
    env = {
        **os.environ,
        "KEYGUARD_STORAGE_URL": redis_server.url,
        "KEYGUARD_REDIS_PREFIX": prefix,
    }
    monkeypatch.setenv("KEYGUARD_STORAGE_URL", redis_server.url)
    monkeypatch.setenv("KEYGUARD_REDIS_PREFIX", prefix)
    ports = [free_port(), free_port()]
    procs: list[subprocess.Popen[str]] = []
    try:
        procs.append(_start(ports[0], env, tmp_path))
        _wait_ready(ports[0], procs[0])  # the first creates the demo key, alone
        procs.append(_start(ports[1], env, tmp_path))
        _wait_ready(ports[1], procs[1])
        procs[0].terminate()
        _, err = procs[0].communicate(timeout=10)
        procs[0] = _start(ports[0], env, tmp_path)  # restarted: prints no key again
        _wait_ready(ports[0], procs[0])
        key = KEY.findall(err)[0]
        yield ports, key
    finally:
        for proc in procs:
            proc.terminate()
            proc.communicate(timeout=10)


def test_two_servers_share_limits_and_revocations(
    servers: tuple[list[int], str], capsys: pytest.CaptureFixture[str]
) -> None:
    """60 calls a minute in all, whichever server they reach; a revocation reaches both."""
    ports, key = servers
    headers = {"X-API-Key": key, "Content-Type": "application/json"}
    statuses = []
    with httpx.Client(timeout=5) as client:
        for i in range(61):
            port = ports[i % 2]
            response = client.post(
                f"http://127.0.0.1:{port}/v1/generate", headers=headers, json={"prompt": "x"}
            )
            statuses.append(response.status_code)
        assert statuses[:60] == [200] * 60
        assert statuses[60] == 429
        assert keyguard_cli(["keys", "list", "--json"]) == 0
        listed = json.loads(capsys.readouterr().out)
        (demo,) = [k for k in listed if k["name"] == "demo"]  # first run also made an admin key
        assert keyguard_cli(["keys", "revoke", demo["id"], "--reason", "test"]) == 0
        capsys.readouterr()
        deadline = time.monotonic() + 1.0
        refused: set[int] = set()
        while refused != {0, 1} and time.monotonic() < deadline:
            for n, port in enumerate(ports):
                answer = client.get(f"http://127.0.0.1:{port}/v1/whoami", headers=headers)
                if answer.status_code == 401:
                    refused.add(n)
            time.sleep(0.02)
        assert refused == {0, 1}
