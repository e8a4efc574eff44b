"""Pure transitions of key records: expiry, rotation grace, revocation, authentication."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keyguard.errors import InvalidCredential, InvalidInput
from keyguard.lifecycle import (
    KeyChanges,
    KeySpec,
    check_secret,
    create_record,
    new_key_id,
    revoke_record,
    rotate_record,
    update_record,
)
from keyguard.records import KeyRecord, KeyStatus

T0 = datetime(2027, 1, 1, tzinfo=UTC)
US = timedelta(microseconds=1)


def record(*, expires_at: datetime | None = None) -> KeyRecord:
    spec = KeySpec(name="svc", expires_at=expires_at).validated()
    return create_record(spec, key_id=new_key_id(T0), digest="a" * 64, hint="kg_live_x…y", now=T0)


def test_t23_expiry_boundary() -> None:
    """A key works until one microsecond before expiry and fails at the instant itself."""
    rec = record(expires_at=T0 + timedelta(days=1))
    end = T0 + timedelta(days=1)
    assert check_secret(rec, "a" * 64, end - US) is rec
    with pytest.raises(InvalidCredential) as info:
        check_secret(rec, "a" * 64, end)
    assert info.value.reason == "expired"
    assert rec.status(end) is KeyStatus.EXPIRED


def test_t24_rotation_with_grace_period() -> None:
    """The old secret works until the grace ends; a second rotation does not extend it."""
    rec = record()
    one = rotate_record(rec, digest="b" * 64, hint="h", now=T0, grace=timedelta(hours=1))
    grace_end = T0 + timedelta(hours=1)
    assert check_secret(one, "b" * 64, T0) is one
    assert check_secret(one, "a" * 64, grace_end - US) is one
    with pytest.raises(InvalidCredential):
        check_secret(one, "a" * 64, grace_end)
    two = rotate_record(
        one, digest="c" * 64, hint="h", now=T0 + timedelta(minutes=30), grace=timedelta(hours=24)
    )
    with pytest.raises(InvalidCredential):
        check_secret(two, "a" * 64, grace_end)
    assert check_secret(two, "b" * 64, grace_end) is two
    assert check_secret(two, "c" * 64, grace_end) is two


def test_t24_revoking_during_grace_stops_every_secret() -> None:
    """Revocation ends the old and the new secret at once."""
    one = rotate_record(record(), digest="b" * 64, hint="h", now=T0, grace=timedelta(hours=1))
    revoked = revoke_record(one, "leaked", T0 + timedelta(minutes=1))
    for digest in ("a" * 64, "b" * 64):
        with pytest.raises(InvalidCredential) as info:
            check_secret(revoked, digest, T0 + timedelta(minutes=1))
        assert info.value.reason == "revoked"


def test_zero_grace_drops_the_old_secret_at_once() -> None:
    """Rotation with zero grace leaves only the new digest."""
    rotated = rotate_record(record(), digest="b" * 64, hint="h", now=T0, grace=timedelta(0))
    assert [d.digest for d in rotated.digests] == ["b" * 64]


def test_expired_previous_secrets_are_pruned_on_rotation() -> None:
    """A rotation drops previous secrets whose grace has ended."""
    one = rotate_record(record(), digest="b" * 64, hint="h", now=T0, grace=timedelta(hours=1))
    two = rotate_record(
        one, digest="c" * 64, hint="h", now=T0 + timedelta(hours=2), grace=timedelta(hours=1)
    )
    assert [d.digest for d in two.digests] == ["c" * 64, "b" * 64]


def test_revoked_key_cannot_be_rotated_or_updated() -> None:
    """Rotation and updates of a revoked key are refused and change nothing."""
    revoked = revoke_record(record(), "", T0)
    with pytest.raises(InvalidInput):
        rotate_record(revoked, digest="b" * 64, hint="h", now=T0, grace=timedelta(0))
    with pytest.raises(InvalidInput):
        update_record(revoked, KeyChanges(name="x").given(), T0)


def test_revoking_twice_keeps_the_first_revocation() -> None:
    """A second revoke returns the record unchanged."""
    first = revoke_record(record(), "one", T0)
    assert revoke_record(first, "two", T0 + timedelta(days=1)) is first


def test_unknown_and_wrong_secret_fail_the_same_way() -> None:
    """No record and a record whose digests do not match both say "unknown"."""
    for rec in (None, record()):
        with pytest.raises(InvalidCredential) as info:
            check_secret(rec, "f" * 64, T0)
        assert info.value.reason == "unknown"
        assert str(info.value) == "invalid or expired credential"


@given(st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2200, 1, 1)))
def test_key_ids_sort_by_creation_time(moment: datetime) -> None:
    """An id made later sorts after one made earlier."""
    earlier = moment.replace(tzinfo=UTC)
    later = earlier + timedelta(milliseconds=1)
    assert new_key_id(earlier)[:12] < new_key_id(later)[:12]


def test_update_applies_only_given_fields() -> None:
    """Fields left UNSET keep their values; None clears an optional one."""
    rec = record()
    changed = update_record(rec, KeyChanges(owner="acme", scopes=("b:*", "a:x")).given(), T0)
    assert (changed.owner, changed.scopes, changed.name) == ("acme", ("a:x", "b:*"), "svc")
    cleared = update_record(changed, KeyChanges(owner=None).given(), T0)
    assert cleared.owner is None
