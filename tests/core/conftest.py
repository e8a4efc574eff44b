"""Fixtures for the settings and CLI tests: a clean environment and a key store URL
that outlives one CLI invocation."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from keyguard.backends import registry
from keyguard.backends.memory import MemoryKeyStore


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No ``KEYGUARD_*`` variable from the developer's shell, and a working directory
    without a ``.env`` (load_settings reads ``./.env``)."""
    for name in list(os.environ):
        if name.upper().startswith("KEYGUARD_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(params=["memory", "sqlite"])
def storage_url(
    request: pytest.FixtureRequest, clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> str:
    """A URL whose keys survive from one ``main()`` call to the next.

    ``memory://`` gives a new store per call, so the memory case registers a scheme
    that hands out one shared store; the SQLite case is a file in ``tmp_path``.
    """
    if request.param == "memory":
        store = MemoryKeyStore()
        monkeypatch.setitem(registry._KEY_STORES, "kgshared", lambda url, **options: store)
        return "kgshared://"
    return f"sqlite:///{clean_env / 'keys.db'}"
