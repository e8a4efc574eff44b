"""Building a guard from settings."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from keyguard.backends.local_limiter import LocalWindowsRateStore
from keyguard.backends.memory_limiter import MemoryRateStore
from keyguard.backends.sqlite_limiter import SQLiteRateStore
from keyguard.configure import build_guard, limiter_url_for, quota_url_for
from keyguard.guard import Allow, Guard
from keyguard.records import LimitOverrides
from keyguard.request import RequestInfo
from keyguard.settings import KeyGuardSettings


def close(guard: Guard) -> None:
    guard.backends.keys.close()
    if guard.backends.limiter is not None:
        guard.backends.limiter.close()


def test_sqlite_storage_counts_windows_in_memory_and_quotas_in_the_file(tmp_path: Path) -> None:
    """The embedded default: windows in this process, quotas in the key file."""
    url = f"sqlite:///{tmp_path / 'k.db'}"
    settings = KeyGuardSettings(storage_url=url)
    assert (limiter_url_for(settings), quota_url_for(settings)) == ("memory://", url)
    guard = build_guard(settings)
    try:
        limiter = guard.backends.limiter
        assert isinstance(limiter, LocalWindowsRateStore)
        assert (guard.threaded, guard.quick_release) == (True, True)
        assert (tmp_path / "k.db-limits.lock").exists()
    finally:
        close(guard)


@pytest.mark.parametrize(
    ("storage", "limiter", "expected"),
    [
        ("sqlite:///{dir}/k.db", "sqlite:///{dir}/k.db", SQLiteRateStore),
        ("sqlite:///{dir}/k.db", "memory://", MemoryRateStore),
        ("memory://", None, MemoryRateStore),
        ("sqlite://:memory:", None, MemoryRateStore),
    ],
)
def test_other_limiter_urls_count_everything_in_one_place(
    tmp_path: Path, storage: str, limiter: str | None, expected: type
) -> None:
    """An explicit limiter URL, memory keys or an in-memory SQLite file: one store."""
    settings = KeyGuardSettings(
        storage_url=storage.format(dir=tmp_path),
        limiter_url=None if limiter is None else limiter.format(dir=tmp_path),
        usage_enabled=False,
    )
    assert quota_url_for(settings) == limiter_url_for(settings)
    guard = build_guard(settings)
    try:
        assert type(guard.backends.limiter) is expected
    finally:
        close(guard)
    locked = (tmp_path / "k.db-limits.lock").exists()
    assert locked == (expected is SQLiteRateStore)  # an explicit memory:// takes no lock


def test_redis_storage_counts_limits_beside_the_keys() -> None:
    """Redis keys put windows and quotas in the same Redis."""
    settings = KeyGuardSettings(storage_url="redis://localhost:6379/0")
    assert limiter_url_for(settings) == quota_url_for(settings) == "redis://localhost:6379/0"


def test_a_restart_keeps_the_quota_and_forgets_the_windows(tmp_path: Path) -> None:
    """A new guard on the same file sees the units charged before, and a fresh window."""
    settings = KeyGuardSettings(storage_url=f"sqlite:///{tmp_path / 'k.db'}", usage_enabled=False)
    guard = build_guard(settings)
    limits = LimitOverrides(rate="1/minute", quota_monthly=50)
    key = settings.manager(guard.backends.keys).create("q", limits=limits).key.reveal()
    request = RequestInfo("GET", "/", ((b"x-api-key", key.encode()),))
    monthly = []
    for restart in range(2):
        if restart:
            guard = build_guard(settings)
        try:
            decision = guard.check(request, cost=5)  # a second one would meet "1/minute"
            assert isinstance(decision, Allow)
            assert decision.identity is not None
            monthly += [s.remaining for s in decision.identity.limits if s.name == "monthly"]
        finally:
            close(guard)
    assert monthly == [45, 40]


def test_settings_reach_the_guard() -> None:
    """Credential methods, header name, public paths and plans come from settings."""
    settings = KeyGuardSettings(
        storage_url="memory://",
        credential_methods=("bearer",),
        api_key_header="x-key",
        public_paths=("/healthz",),
        auth_failures=0,
    )
    guard = build_guard(settings)
    try:
        assert guard.credentials.methods == ("bearer",)
        assert guard.credentials.header_name == "x-key"
        assert guard.check(RequestInfo("GET", "/healthz")) == Allow(None)
        assert set(guard.plans) == set(settings.plans)
        assert isinstance(guard.backends.limiter, MemoryRateStore)
    finally:
        close(guard)


def test_t95_per_worker_memory_limits_are_announced(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """With several workers and in-memory limits, start-up warns that limits multiply."""
    monkeypatch.setenv("WEB_CONCURRENCY", "4")
    with caplog.at_level(logging.WARNING, logger="keyguard"):
        close(build_guard(KeyGuardSettings(storage_url="memory://")))
    assert "per worker" in caplog.text
    caplog.clear()
    monkeypatch.setenv("WEB_CONCURRENCY", "1")
    with caplog.at_level(logging.WARNING, logger="keyguard"):
        close(build_guard(KeyGuardSettings(storage_url="memory://")))
    assert caplog.text == ""


# -- one process per file may count its windows in memory ------------------------------

START_GUARD = """
import sys
from keyguard import build_guard, load_settings
from keyguard.errors import ConfigurationError
try:
    build_guard(load_settings(env_file=None))
except ConfigurationError as exc:
    print(exc, flush=True)
    sys.exit(3)
print("started", flush=True)
"""


def start_elsewhere(url: str, limiter_url: str | None = None) -> str:
    """Start a guard in another process on ``url``: "started", or its start-up error."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("KEYGUARD_")}
    env |= {"KEYGUARD_STORAGE_URL": url, "KEYGUARD_USAGE_ENABLED": "false"}
    if limiter_url is not None:
        env["KEYGUARD_LIMITER_URL"] = limiter_url
    done = subprocess.run(
        [sys.executable, "-c", START_GUARD],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode in (0, 3), done.stderr
    return done.stdout.strip()


@pytest.mark.skipif(sys.platform == "win32", reason="no fcntl: nothing is checked")
def test_a_second_process_on_the_file_is_refused_at_start_up(tmp_path: Path) -> None:
    """While one process counts a file's windows in memory, another cannot start on it."""
    url = f"sqlite:///{tmp_path / 'k.db'}"
    settings = KeyGuardSettings(storage_url=url, usage_enabled=False)
    first = build_guard(settings)
    second = build_guard(settings)  # the same process again: it shares its lock
    try:
        refused = start_elsewhere(url)
        assert str(tmp_path / "k.db") in refused
        assert f"KEYGUARD_LIMITER_URL=sqlite:///{tmp_path / 'k.db'}" in refused
        assert "another process" in start_elsewhere(url, limiter_url=url)
        assert start_elsewhere(url, limiter_url="memory://") == "started"  # no lock
    finally:
        close(first)
        close(second)


@pytest.mark.skipif(sys.platform == "win32", reason="no fcntl: nothing is checked")
def test_processes_that_count_in_the_file_all_start(tmp_path: Path) -> None:
    """With KEYGUARD_LIMITER_URL naming the file in every process, every process starts;
    one on the default then cannot."""
    url = f"sqlite:///{tmp_path / 'k.db'}"
    guard = build_guard(KeyGuardSettings(storage_url=url, limiter_url=url, usage_enabled=False))
    try:
        assert isinstance(guard.backends.limiter, SQLiteRateStore)
        assert start_elsewhere(url, limiter_url=url) == "started"
        assert "already counts the limits" in start_elsewhere(url)  # the default: in memory
    finally:
        close(guard)


def test_several_workers_on_the_default_are_warned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """WEB_CONCURRENCY above 1 on the default says why the other workers will not start."""
    monkeypatch.setenv("WEB_CONCURRENCY", "4")
    settings = KeyGuardSettings(storage_url=f"sqlite:///{tmp_path / 'k.db'}", usage_enabled=False)
    with caplog.at_level(logging.WARNING, logger="keyguard"):
        close(build_guard(settings))
    assert "KEYGUARD_LIMITER_URL" in caplog.text
