"""Fixtures for the key-store contract: every backend, through each of its two faces."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from keyguard.backends.memory import MemoryKeyStore
from keyguard.backends.protocols import AsyncKeyStore, KeyBackend, KeyStore
from keyguard.backends.sqlite import SQLiteKeyStore
from keyguard.records import (
    AuditEvent,
    KeyPage,
    KeyQuery,
    KeyRecord,
    LimitOverrides,
    SecretDigest,
)
from keyguard.testing import FakeClock
from tests.redis_support import own_redis, redis_cluster, redis_server

__all__ = ["own_redis", "redis_cluster", "redis_server"]  # fixtures for every backend test

T0 = datetime(2027, 1, 1, tzinfo=UTC)


class AsyncFace:
    """The async face of a store behind the sync interface, so each test is written once."""

    def __init__(self, store: AsyncKeyStore) -> None:
        self._store = store

    def get(self, key_id: str) -> KeyRecord | None:
        return asyncio.run(self._store.aget(key_id))

    def find(self, digest: str) -> KeyRecord | None:
        return asyncio.run(self._store.afind(digest))

    def save(self, record: KeyRecord, event: AuditEvent) -> None:
        asyncio.run(self._store.asave(record, event))

    def delete(self, key_id: str, event: AuditEvent) -> bool:
        return asyncio.run(self._store.adelete(key_id, event))

    def list(self, query: KeyQuery) -> KeyPage:
        return asyncio.run(self._store.alist(query))

    def audit(self, key_id: str | None = None, limit: int = 100) -> Sequence[AuditEvent]:
        return asyncio.run(self._store.aaudit(key_id, limit))

    def close(self) -> None:
        asyncio.run(self._store.aclose())


def open_backend(kind: str, tmp_path: Path) -> KeyBackend:
    if kind == "memory":
        return MemoryKeyStore()
    return SQLiteKeyStore(tmp_path / "keys.db")


def open_redis_backend(url: str) -> KeyBackend:
    """A Redis store under a prefix of its own, so tests sharing a server never meet.

    Its clock stands still at T0: the records here carry fixed dates (2027), and the
    store derives the TTL of a rotated-out digest from them, which must not depend on
    the day the suite runs. The contract is not about timeouts: a loaded CI machine
    once took more than the default 50 ms to connect on loopback, so these wait longer.
    """
    from keyguard.backends.redis import RedisKeyStore  # only Redis rows need redis-py

    prefix = f"kgtest-{uuid.uuid4().hex[:12]}"
    return RedisKeyStore.from_url(
        url, prefix=prefix, clock=FakeClock(T0), socket_connect_timeout=2, socket_timeout=2
    )


@pytest.fixture(
    params=[
        "memory",
        "sqlite",
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("redis-cluster", marks=pytest.mark.redis),
    ]
)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[KeyBackend]:
    """A fresh, empty store of each backend, closed after the test."""
    if request.param == "redis":
        store = open_redis_backend(request.getfixturevalue("redis_server").url)
    elif request.param == "redis-cluster":
        store = open_redis_backend(request.getfixturevalue("redis_cluster").url)
    else:
        store = open_backend(request.param, tmp_path)
    yield store
    store.close()


@pytest.fixture(params=["sync", "async"])
def store(request: pytest.FixtureRequest, backend: KeyBackend) -> KeyStore:
    """The backend through its sync methods, or through its async ones."""
    return backend if request.param == "sync" else AsyncFace(backend)


def digest_of(label: str) -> str:
    return hashlib.sha256(label.encode()).hexdigest()


def _make_record(
    n: int,
    *,
    owner: str | None = None,
    plan: str = "free",
    expires_at: datetime | None = None,
    revoked_at: datetime | None = None,
    digests: tuple[SecretDigest, ...] | None = None,
) -> KeyRecord:
    return KeyRecord(
        id=f"key_{n:04d}",
        name=f"key number {n}",
        hint=f"kg_live_{n:04d}…wxyz",
        digests=(SecretDigest(digest_of(f"secret-{n}")),) if digests is None else digests,
        created_at=T0 + timedelta(seconds=n),
        updated_at=T0 + timedelta(seconds=n, microseconds=250),
        owner=owner,
        scopes=("text:generate", "image:*"),
        plan=plan,
        limits=LimitOverrides(rate="60/minute", quota_monthly=1000),
        ip_allow=("10.0.0.0/8", "2001:db8::/32"),
        expires_at=expires_at,
        revoked_at=revoked_at,
        revoked_reason=None if revoked_at is None else "leaked",
        metadata={"team": "search", "tier": 2, "tags": ["a", "b"], "nested": {"ok": True}},
    )


@pytest.fixture
def make_record() -> Callable[..., KeyRecord]:
    """Builds a fully populated record ``key_NNNN`` whose ids sort by ``n``."""
    return _make_record


def _make_event(key_id: str, action: str = "create", *, seconds: int = 0) -> AuditEvent:
    return AuditEvent(T0 + timedelta(seconds=seconds), "admin", action, key_id, {"n": seconds})


@pytest.fixture
def make_event() -> Callable[..., AuditEvent]:
    """Builds an audit event for a key."""
    return _make_event


@pytest.fixture
def db(tmp_path: Path) -> Path:
    """A SQLite file for one test."""
    return tmp_path / "keys.db"


@pytest.fixture
def sqlite_store(db: Path) -> Iterator[SQLiteKeyStore]:
    store = SQLiteKeyStore(db)
    yield store
    store.close()
