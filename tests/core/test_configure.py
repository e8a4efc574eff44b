"""Building a guard from settings."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from keyguard.backends.memory_limiter import MemoryRateStore
from keyguard.backends.sqlite_limiter import SQLiteRateStore
from keyguard.configure import build_guard, limiter_url_for
from keyguard.guard import Allow, Guard
from keyguard.request import RequestInfo
from keyguard.settings import KeyGuardSettings


def close(guard: Guard) -> None:
    guard.backends.keys.close()
    if guard.backends.limiter is not None:
        guard.backends.limiter.close()


def test_limits_live_beside_sqlite_keys(tmp_path: Path) -> None:
    """A SQLite key store shares its file with the limiter; memory keys count in memory."""
    url = f"sqlite:///{tmp_path / 'k.db'}"
    assert limiter_url_for(KeyGuardSettings(storage_url=url)) == url
    assert limiter_url_for(KeyGuardSettings(storage_url="memory://")) == "memory://"
    explicit = KeyGuardSettings(storage_url=url, limiter_url="memory://")
    assert limiter_url_for(explicit) == "memory://"
    guard = build_guard(KeyGuardSettings(storage_url=url))
    try:
        assert isinstance(guard.backends.limiter, SQLiteRateStore)
    finally:
        close(guard)


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
