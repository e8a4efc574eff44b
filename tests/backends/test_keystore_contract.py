"""The one key-store contract: every backend, through its sync face and its async face.

A new backend is done when this file passes against it (add it to ``open_backend``
in ``conftest.py``).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Protocol

import pytest

from keyguard.backends.protocols import KeyBackend, KeyStore
from keyguard.errors import InvalidCredential, StorageError
from keyguard.keys import Secret
from keyguard.manager import AsyncKeyManager, IssuedKey, KeyManager
from keyguard.records import AuditEvent, KeyQuery, KeyRecord, KeyStatus, SecretDigest
from keyguard.testing import FakeClock

MakeRecord = Callable[..., KeyRecord]
MakeEvent = Callable[..., AuditEvent]
NOW = datetime(2027, 1, 2, tzinfo=UTC)
HOUR = timedelta(hours=1)


def test_save_then_get_and_find_return_an_equal_record(
    store: KeyStore, make_record: MakeRecord, make_event: MakeEvent
) -> None:
    """A saved record comes back equal, field for field, by id and by digest."""
    record = make_record(1, owner="acme", expires_at=NOW + timedelta(microseconds=7))
    store.save(record, make_event(record.id))
    assert store.get(record.id) == record
    assert store.find(record.digests[0].digest) == record


def test_get_and_find_of_unknown_return_none(
    store: KeyStore, make_record: MakeRecord, make_event: MakeEvent
) -> None:
    """An unknown id or digest is ``None``, on an empty store and on a populated one."""
    assert store.get("key_nope") is None
    assert store.find("0" * 64) is None
    record = make_record(1)
    store.save(record, make_event(record.id))
    assert store.get("key_nope") is None
    assert store.find("0" * 64) is None


def test_find_by_previous_digest_after_rotation(
    store: KeyStore, make_record: MakeRecord, make_event: MakeEvent
) -> None:
    """After a re-save with a new current digest, the previous one still finds the record."""
    record = make_record(1)
    store.save(record, make_event(record.id))
    old = record.digests[0].digest
    rotated = replace(
        record, digests=(SecretDigest("f" * 64), SecretDigest(old, NOW + HOUR)), hint="new"
    )
    store.save(rotated, make_event(record.id, "rotate", seconds=1))
    assert store.find("f" * 64) == rotated
    assert store.find(old) == rotated
    assert store.get(record.id) == rotated


def test_resave_drops_digests_the_record_no_longer_has(
    store: KeyStore, make_record: MakeRecord, make_event: MakeEvent
) -> None:
    """A digest left out of a re-saved record no longer finds it."""
    record = make_record(1)
    store.save(record, make_event(record.id))
    old = record.digests[0].digest
    store.save(replace(record, digests=(SecretDigest("e" * 64),)), make_event(record.id))
    assert store.find(old) is None
    assert store.find("e" * 64) is not None


def test_delete_removes_the_record_and_all_its_digests(
    store: KeyStore, make_record: MakeRecord, make_event: MakeEvent
) -> None:
    """Deleting a key removes it by id, by every digest and from listings."""
    record = make_record(1, digests=(SecretDigest("a" * 64), SecretDigest("b" * 64, NOW)))
    other = make_record(2)
    store.save(record, make_event(record.id))
    store.save(other, make_event(other.id))
    assert store.delete(record.id, make_event(record.id, "delete")) is True
    assert store.get(record.id) is None
    assert store.find("a" * 64) is None
    assert store.find("b" * 64) is None
    assert store.list(KeyQuery()).items == (other,)
    assert store.find(other.digests[0].digest) == other


def test_delete_of_unknown_returns_false_and_audits_nothing(
    store: KeyStore, make_event: MakeEvent
) -> None:
    """Deleting a key that does not exist changes nothing, the audit trail included."""
    assert store.delete("key_nope", make_event("key_nope", "delete")) is False
    assert list(store.audit()) == []


def test_list_filters_by_owner_and_plan(
    store: KeyStore, make_record: MakeRecord, make_event: MakeEvent
) -> None:
    """Owner and plan filters select exactly the matching records, alone and together."""
    rows = [
        make_record(1, owner="acme", plan="free"),
        make_record(2, owner="acme", plan="premium"),
        make_record(3, owner="globex", plan="premium"),
        make_record(4, owner=None, plan="free"),
    ]
    for r in rows:
        store.save(r, make_event(r.id))

    def ids(owner: str | None = None, plan: str | None = None) -> list[str]:
        return [r.id for r in store.list(KeyQuery(owner=owner, plan=plan)).items]

    assert ids(owner="acme") == ["key_0001", "key_0002"]
    assert ids(plan="premium") == ["key_0002", "key_0003"]
    assert ids(owner="acme", plan="premium") == ["key_0002"]
    assert ids(owner="nobody") == []
    assert ids() == ["key_0001", "key_0002", "key_0003", "key_0004"]


def test_list_filters_by_status_at_the_given_now(
    store: KeyStore, make_record: MakeRecord, make_event: MakeEvent
) -> None:
    """Status follows KeyRecord.status at ``query.now``, boundaries and future revocations too."""
    second = timedelta(seconds=1)
    rows = [
        make_record(1),
        make_record(2, expires_at=NOW + second),
        make_record(3, expires_at=NOW - second),
        make_record(4, expires_at=NOW),
        make_record(5, revoked_at=NOW - HOUR),
        make_record(6, revoked_at=NOW),
        make_record(7, revoked_at=NOW - HOUR, expires_at=NOW - HOUR),
        make_record(8, revoked_at=NOW + HOUR),
        make_record(9, revoked_at=NOW + HOUR, expires_at=NOW - second),
    ]
    for r in rows:
        store.save(r, make_event(r.id))
    for status in KeyStatus:
        page = store.list(KeyQuery(status=status, now=NOW))
        assert [r.id for r in page.items] == [r.id for r in rows if r.status(NOW) is status]
    assert len(store.list(KeyQuery(status=KeyStatus.ACTIVE, now=NOW)).items) == 3
    later = NOW + 2 * HOUR
    revoked_later = store.list(KeyQuery(status=KeyStatus.REVOKED, now=later)).items
    assert [r.id for r in revoked_later] == [f"key_{n:04d}" for n in range(5, 10)]


def test_status_filter_without_now_is_refused() -> None:
    """A status filter with no ``now`` is a ValueError, not a guess at the time."""
    with pytest.raises(ValueError, match="time"):
        KeyQuery(status=KeyStatus.ACTIVE)
    with pytest.raises(ValueError, match="at least one"):
        KeyQuery(limit=0)


def test_cursor_pagination_returns_every_record_once_in_id_order(
    store: KeyStore, make_record: MakeRecord, make_event: MakeEvent
) -> None:
    """Paging 25 records (saved out of order) 10 at a time yields all, in order, once."""
    numbers = list(range(1, 26))
    random.Random(7).shuffle(numbers)
    for n in numbers:
        store.save(make_record(n), make_event(f"key_{n:04d}"))
    pages, after = [], None
    while True:
        page = store.list(KeyQuery(after=after, limit=10))
        pages.append([r.id for r in page.items])
        if page.next_cursor is None:
            break
        assert page.next_cursor == page.items[-1].id
        after = page.next_cursor
    assert [len(p) for p in pages] == [10, 10, 5]
    assert [i for p in pages for i in p] == [f"key_{n:04d}" for n in range(1, 26)]


def test_a_page_that_ends_the_listing_has_no_cursor(
    store: KeyStore, make_record: MakeRecord, make_event: MakeEvent
) -> None:
    """When the last page is exactly full, its cursor is ``None`` (no empty extra page)."""
    for n in range(1, 21):
        store.save(make_record(n), make_event(f"key_{n:04d}"))
    first = store.list(KeyQuery(limit=10))
    assert first.next_cursor == "key_0010"
    second = store.list(KeyQuery(limit=10, after=first.next_cursor))
    assert [r.id for r in second.items][-1] == "key_0020"
    assert second.next_cursor is None
    assert store.list(KeyQuery(after="key_0020")).items == ()


def test_cursor_pagination_combines_with_filters(
    store: KeyStore, make_record: MakeRecord, make_event: MakeEvent
) -> None:
    """A filtered listing pages over the matching records only."""
    for n in range(1, 26):
        store.save(make_record(n, owner="even" if n % 2 == 0 else "odd"), make_event(f"k{n}"))
    first = store.list(KeyQuery(owner="even", limit=5))
    assert [r.id for r in first.items] == [f"key_{n:04d}" for n in (2, 4, 6, 8, 10)]
    rest = store.list(KeyQuery(owner="even", limit=10, after=first.next_cursor))
    assert [r.id for r in rest.items] == [f"key_{n:04d}" for n in (12, 14, 16, 18, 20, 22, 24)]
    assert rest.next_cursor is None


def test_audit_is_newest_first_filtered_by_key_and_limited(
    store: KeyStore, make_record: MakeRecord, make_event: MakeEvent
) -> None:
    """The audit trail lists the newest events first, per key or for all, up to ``limit``."""
    a, b = make_record(1), make_record(2)
    store.save(a, make_event(a.id, "create", seconds=1))
    store.save(b, make_event(b.id, "create", seconds=2))
    store.save(a, make_event(a.id, "update", seconds=3))
    store.delete(b.id, make_event(b.id, "delete", seconds=4))
    everything = store.audit()
    assert [(e.key_id, e.action) for e in everything] == [
        (b.id, "delete"),
        (a.id, "update"),
        (b.id, "create"),
        (a.id, "create"),
    ]
    assert everything[0] == make_event(b.id, "delete", seconds=4)
    assert [e.action for e in store.audit(a.id)] == ["update", "create"]
    assert [e.action for e in store.audit(b.id, limit=1)] == ["delete"]
    assert len(store.audit(limit=3)) == 3
    assert list(store.audit("key_nope")) == []


# The manager end to end over each backend, through KeyManager and AsyncKeyManager.


class Manager(Protocol):
    async def create(self, name: str) -> IssuedKey: ...
    async def authenticate(self, raw: Secret) -> KeyRecord: ...
    async def rotate(self, key_id: str, *, grace: timedelta) -> IssuedKey: ...
    async def revoke(self, key_id: str) -> KeyRecord: ...
    async def audit(self, key_id: str) -> list[AuditEvent]: ...


class SyncManager:
    """KeyManager behind awaitable methods, so one scenario drives both managers."""

    def __init__(self, manager: KeyManager) -> None:
        self._m = manager

    async def create(self, name: str) -> IssuedKey:
        return self._m.create(name)

    async def authenticate(self, raw: Secret) -> KeyRecord:
        return self._m.authenticate(raw)

    async def rotate(self, key_id: str, *, grace: timedelta) -> IssuedKey:
        return self._m.rotate(key_id, grace=grace)

    async def revoke(self, key_id: str) -> KeyRecord:
        return self._m.revoke(key_id)

    async def audit(self, key_id: str) -> list[AuditEvent]:
        return list(self._m.audit(key_id))


class AsyncManager:
    def __init__(self, manager: AsyncKeyManager) -> None:
        self._m = manager

    async def create(self, name: str) -> IssuedKey:
        return await self._m.create(name)

    async def authenticate(self, raw: Secret) -> KeyRecord:
        return await self._m.authenticate(raw)

    async def rotate(self, key_id: str, *, grace: timedelta) -> IssuedKey:
        return await self._m.rotate(key_id, grace=grace)

    async def revoke(self, key_id: str) -> KeyRecord:
        return await self._m.revoke(key_id)

    async def audit(self, key_id: str) -> list[AuditEvent]:
        return list(await self._m.audit(key_id))


@pytest.mark.parametrize("face", ["sync", "async"])
async def test_manager_rotation_grace_and_revocation_end_to_end(
    backend: KeyBackend, face: str
) -> None:
    """Create, authenticate, rotate with 1 h grace, outlive the grace, revoke: over each store."""
    clock = FakeClock()
    manager: Manager = (
        SyncManager(KeyManager(backend, clock=clock))
        if face == "sync"
        else AsyncManager(AsyncKeyManager(backend, clock=clock))
    )
    issued = await manager.create("svc")
    assert (await manager.authenticate(issued.key)).id == issued.record.id

    rotated = await manager.rotate(issued.record.id, grace=HOUR)
    assert rotated.record.id == issued.record.id
    clock.advance(HOUR - timedelta(seconds=1))
    assert (await manager.authenticate(issued.key)).id == issued.record.id
    assert (await manager.authenticate(rotated.key)).id == issued.record.id
    clock.advance(timedelta(seconds=1))
    with pytest.raises(InvalidCredential):
        await manager.authenticate(issued.key)
    assert (await manager.authenticate(rotated.key)).id == issued.record.id

    await manager.revoke(issued.record.id)
    with pytest.raises(InvalidCredential):
        await manager.authenticate(rotated.key)
    actions = [e.action for e in await manager.audit(issued.record.id)]
    assert actions == ["revoke", "rotate", "create"]


def test_a_digest_never_belongs_to_two_keys(
    store: KeyStore, make_record: MakeRecord, make_event: MakeEvent
) -> None:
    """Saving a record whose digest another key holds fails and changes nothing."""
    first = make_record(1)
    store.save(first, make_event(first.id))
    clash = make_record(2, digests=first.digests)
    with pytest.raises(StorageError):
        store.save(clash, make_event(clash.id))
    assert store.get(clash.id) is None
    found = store.find(first.digests[0].digest)
    assert found is not None
    assert found.id == first.id
