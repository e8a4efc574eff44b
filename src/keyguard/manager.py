"""Admin operations on keys: create, get, list, update, revoke, rotate, delete.

:class:`KeyManager` and :class:`AsyncKeyManager` are thin shells: each method builds a
flow from :class:`KeyFlows` (written once) and runs it with the sync or async driver.
Every change appends an audit event in the same store call that writes the record.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from .backends.protocols import AsyncKeyStore, KeyStore
from .clock import Clock, SystemClock, utcnow
from .errors import InvalidInput, KeyNotFound
from .flows import Audit, Delete, Find, Flow, Get, List, Save, call, run_async, run_sync
from .keys import KeyFormat, KeyHasher, Secret
from .lifecycle import (
    KeyChanges,
    KeySpec,
    check_secret,
    create_record,
    new_key_id,
    revoke_record,
    rotate_record,
    update_record,
)
from .records import JSON, AuditEvent, KeyPage, KeyQuery, KeyRecord, KeyStatus, LimitOverrides
from .validation import validate_expiry, validate_label, validate_reason

__all__ = ["AsyncKeyManager", "IssuedKey", "KeyEventHook", "KeyFlows", "KeyManager"]

_logger = logging.getLogger("keyguard")
KeyEventHook = Callable[[AuditEvent, KeyRecord], None]

DEFAULT_GRACE = timedelta(hours=24)
MAX_PAGE = 1000


@dataclass(frozen=True, slots=True)
class IssuedKey:
    """A key as handed out by create or rotate: the only time the secret is visible."""

    record: KeyRecord
    key: Secret


def _changed(changes: Mapping[str, object]) -> dict[str, JSON]:
    """Audit details for an update: the names of the changed fields, no values."""
    return {"fields": [*sorted(changes)]}


class KeyFlows:
    """The admin operations, written once as flows (see :mod:`keyguard.flows`)."""

    def __init__(
        self,
        *,
        key_format: KeyFormat | None = None,
        hasher: KeyHasher | None = None,
        clock: Clock | None = None,
        default_grace: timedelta = DEFAULT_GRACE,
        actor: str = "system",
        on_event: KeyEventHook | None = None,
    ) -> None:
        self.key_format = key_format or KeyFormat()
        self.hasher = hasher or KeyHasher()
        self.clock = clock or SystemClock()
        self.default_grace = default_grace
        self.actor = validate_label("actor", actor)
        self.on_event = on_event

    def _saved(self, op: Save | Delete, record: KeyRecord) -> Flow[None]:
        """Run a write, then tell ``on_event`` (only once the store accepted it).

        The change is already stored, so a failing hook is logged (its type only) and
        the admin call still succeeds: an observer must not turn a write into an error.
        """
        yield from call(op)
        if self.on_event is not None:
            try:
                self.on_event(op.event, record)
            except Exception as exc:
                _logger.error("keyguard on_event hook failed: %s", type(exc).__name__)

    def _now(self) -> datetime:
        return utcnow(self.clock)

    def _event(
        self,
        now: datetime,
        action: str,
        key_id: str,
        actor: str | None,
        details: Mapping[str, JSON] | None = None,
    ) -> AuditEvent:
        who = self.actor if actor is None else validate_label("actor", actor)
        return AuditEvent(now, who, action, key_id, dict(details or {}))

    def _existing(self, key_id: str) -> Flow[KeyRecord]:
        if not isinstance(key_id, str) or len(key_id) > 64:
            raise KeyNotFound(str(key_id)[:64])
        record = yield from call(Get(key_id))
        if record is None:
            raise KeyNotFound(key_id)
        return record

    def create(
        self,
        spec: KeySpec,
        *,
        expires: datetime | timedelta | str | None = None,
        env: str | None = None,
        actor: str | None = None,
    ) -> Flow[IssuedKey]:
        now = self._now()
        spec = spec.validated()
        if expires is not None:
            spec = replace(spec, expires_at=validate_expiry(expires, now))
        if env is not None and env not in self.key_format.environments:
            raise InvalidInput("env", f"must be one of {', '.join(self.key_format.environments)}")
        key = self.key_format.generate(env)
        record = create_record(
            spec,
            key_id=new_key_id(now),
            digest=self.hasher.digest(key),
            hint=self.key_format.hint(key),
            now=now,
        )
        details: dict[str, JSON] = {
            "name": record.name,
            "scopes": [*record.scopes],
            "plan": record.plan,
        }
        event = self._event(now, "create", record.id, actor, details)
        yield from self._saved(Save(record, event), record)
        return IssuedKey(record, key)

    def get(self, key_id: str) -> Flow[KeyRecord]:
        return (yield from self._existing(key_id))

    def list(
        self,
        *,
        owner: str | None = None,
        status: KeyStatus | str | None = None,
        plan: str | None = None,
        after: str | None = None,
        limit: int = 100,
    ) -> Flow[KeyPage]:
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
            raise InvalidInput("limit", f"must be between 1 and {MAX_PAGE}")
        try:
            status = None if status is None else KeyStatus(status)
        except ValueError:
            raise InvalidInput("status", "must be active, expired or revoked") from None
        if after is not None and (not isinstance(after, str) or len(after) > 64):
            raise InvalidInput("after", "is not a cursor from a previous page")
        query = KeyQuery(
            owner=owner, status=status, plan=plan, after=after, limit=limit, now=self._now()
        )
        return (yield from call(List(query)))

    def update(
        self,
        key_id: str,
        changes: KeyChanges,
        *,
        expires: datetime | timedelta | str | None = None,
        actor: str | None = None,
    ) -> Flow[KeyRecord]:
        now = self._now()
        given = changes.given()
        if expires is not None:
            given["expires_at"] = validate_expiry(expires, now)
        if not given:
            raise InvalidInput("changes", "nothing to change")
        record = yield from self._existing(key_id)
        updated = update_record(record, given, now)
        event = self._event(now, "update", key_id, actor, _changed(given))
        yield from self._saved(Save(updated, event), updated)
        return updated

    def revoke(self, key_id: str, *, reason: str = "", actor: str | None = None) -> Flow[KeyRecord]:
        now = self._now()
        reason = validate_reason(reason)
        record = yield from self._existing(key_id)
        revoked = revoke_record(record, reason, now)
        if revoked is not record:
            event = self._event(now, "revoke", key_id, actor, {"reason": reason})
            yield from self._saved(Save(revoked, event), revoked)
        return revoked

    def rotate(
        self, key_id: str, *, grace: timedelta | None = None, actor: str | None = None
    ) -> Flow[IssuedKey]:
        now = self._now()
        grace = self.default_grace if grace is None else grace
        record = yield from self._existing(key_id)
        env = record.hint.split("_")[1] if record.hint.count("_") >= 2 else None
        key = self.key_format.generate(env if env in self.key_format.environments else None)
        rotated = rotate_record(
            record,
            digest=self.hasher.digest(key),
            hint=self.key_format.hint(key),
            now=now,
            grace=grace,
        )
        event = self._event(now, "rotate", key_id, actor, {"grace_seconds": grace.total_seconds()})
        yield from self._saved(Save(rotated, event), rotated)
        return IssuedKey(rotated, key)

    def delete(self, key_id: str, *, actor: str | None = None) -> Flow[None]:
        now = self._now()
        record = yield from self._existing(key_id)
        yield from self._saved(Delete(key_id, self._event(now, "delete", key_id, actor)), record)

    def authenticate(self, raw: str | Secret) -> Flow[KeyRecord]:
        """The active record a presented key belongs to.

        A malformed key is refused offline (no storage call); every other failure
        raises the same :class:`~keyguard.errors.InvalidCredential`.
        """
        parsed = self.key_format.parse(raw)
        digest = self.hasher.digest(parsed.secret)
        record = yield from call(Find(digest))
        return check_secret(record, digest, self._now())

    def audit(self, key_id: str | None = None, *, limit: int = 100) -> Flow[Sequence[AuditEvent]]:
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
            raise InvalidInput("limit", f"must be between 1 and {MAX_PAGE}")
        return (yield from call(Audit(key_id, limit)))


def _spec(
    *,
    name: str,
    owner: str | None,
    scopes: Sequence[str],
    plan: str,
    limits: LimitOverrides | None,
    ip_allow: Sequence[str],
    metadata: Mapping[str, JSON] | None,
) -> KeySpec:
    return KeySpec(
        name=name,
        owner=owner,
        scopes=tuple(scopes),
        plan=plan,
        limits=limits or LimitOverrides(),
        ip_allow=tuple(ip_allow),
        metadata=None if metadata is None else dict(metadata),
    )


class KeyManager:
    """Admin operations on a sync key store.

    :param store: where keys live (see :func:`keyguard.backends.open_key_store`).
    :param key_format: prefix, environments and length of new keys.
    :param hasher: how secrets are digested (set a pepper in production).
    :param clock: the time source; inject a fake one in tests.
    :param default_grace: how long a rotated key's old secret keeps working.
    :param actor: who the audit trail names when a call does not say.
    :param on_event: called with the audit event and the record (as it was before a
        delete) after each change is stored, e.g. ``Alerts.key_changed``; it runs on
        the caller's thread, so it should be quick.
    """

    def __init__(self, store: KeyStore, **options: object) -> None:
        self.store = store
        self.flows = KeyFlows(**options)  # type: ignore[arg-type]

    def create(
        self,
        name: str,
        *,
        owner: str | None = None,
        scopes: Sequence[str] = (),
        plan: str = "free",
        limits: LimitOverrides | None = None,
        ip_allow: Sequence[str] = (),
        expires: datetime | timedelta | str | None = None,
        metadata: Mapping[str, JSON] | None = None,
        env: str | None = None,
        actor: str | None = None,
    ) -> IssuedKey:
        """A new key; ``IssuedKey.key`` is the only copy of the secret there will be."""
        spec = _spec(
            name=name,
            owner=owner,
            scopes=scopes,
            plan=plan,
            limits=limits,
            ip_allow=ip_allow,
            metadata=metadata,
        )
        return run_sync(self.flows.create(spec, expires=expires, env=env, actor=actor), self.store)

    def get(self, key_id: str) -> KeyRecord:
        return run_sync(self.flows.get(key_id), self.store)

    def list(
        self,
        *,
        owner: str | None = None,
        status: KeyStatus | str | None = None,
        plan: str | None = None,
        after: str | None = None,
        limit: int = 100,
    ) -> KeyPage:
        flow = self.flows.list(owner=owner, status=status, plan=plan, after=after, limit=limit)
        return run_sync(flow, self.store)

    def update(
        self,
        key_id: str,
        changes: KeyChanges,
        *,
        expires: datetime | timedelta | str | None = None,
        actor: str | None = None,
    ) -> KeyRecord:
        return run_sync(
            self.flows.update(key_id, changes, expires=expires, actor=actor), self.store
        )

    def revoke(self, key_id: str, *, reason: str = "", actor: str | None = None) -> KeyRecord:
        """Revoke at once; revoking a revoked key changes nothing."""
        return run_sync(self.flows.revoke(key_id, reason=reason, actor=actor), self.store)

    def rotate(
        self, key_id: str, *, grace: timedelta | None = None, actor: str | None = None
    ) -> IssuedKey:
        """A new secret for the same key; the old one works for ``grace`` more."""
        return run_sync(self.flows.rotate(key_id, grace=grace, actor=actor), self.store)

    def delete(self, key_id: str, *, actor: str | None = None) -> None:
        run_sync(self.flows.delete(key_id, actor=actor), self.store)

    def authenticate(self, raw: str | Secret) -> KeyRecord:
        """The active record for a presented key, or :class:`InvalidCredential`."""
        return run_sync(self.flows.authenticate(raw), self.store)

    def audit(self, key_id: str | None = None, *, limit: int = 100) -> Sequence[AuditEvent]:
        return run_sync(self.flows.audit(key_id, limit=limit), self.store)


class AsyncKeyManager:
    """The async twin of :class:`KeyManager`; same parameters, same flows."""

    def __init__(self, store: AsyncKeyStore, **options: object) -> None:
        self.store = store
        self.flows = KeyFlows(**options)  # type: ignore[arg-type]

    async def create(
        self,
        name: str,
        *,
        owner: str | None = None,
        scopes: Sequence[str] = (),
        plan: str = "free",
        limits: LimitOverrides | None = None,
        ip_allow: Sequence[str] = (),
        expires: datetime | timedelta | str | None = None,
        metadata: Mapping[str, JSON] | None = None,
        env: str | None = None,
        actor: str | None = None,
    ) -> IssuedKey:
        spec = _spec(
            name=name,
            owner=owner,
            scopes=scopes,
            plan=plan,
            limits=limits,
            ip_allow=ip_allow,
            metadata=metadata,
        )
        flow = self.flows.create(spec, expires=expires, env=env, actor=actor)
        return await run_async(flow, self.store)

    async def get(self, key_id: str) -> KeyRecord:
        return await run_async(self.flows.get(key_id), self.store)

    async def list(
        self,
        *,
        owner: str | None = None,
        status: KeyStatus | str | None = None,
        plan: str | None = None,
        after: str | None = None,
        limit: int = 100,
    ) -> KeyPage:
        flow = self.flows.list(owner=owner, status=status, plan=plan, after=after, limit=limit)
        return await run_async(flow, self.store)

    async def update(
        self,
        key_id: str,
        changes: KeyChanges,
        *,
        expires: datetime | timedelta | str | None = None,
        actor: str | None = None,
    ) -> KeyRecord:
        flow = self.flows.update(key_id, changes, expires=expires, actor=actor)
        return await run_async(flow, self.store)

    async def revoke(self, key_id: str, *, reason: str = "", actor: str | None = None) -> KeyRecord:
        return await run_async(self.flows.revoke(key_id, reason=reason, actor=actor), self.store)

    async def rotate(
        self, key_id: str, *, grace: timedelta | None = None, actor: str | None = None
    ) -> IssuedKey:
        return await run_async(self.flows.rotate(key_id, grace=grace, actor=actor), self.store)

    async def delete(self, key_id: str, *, actor: str | None = None) -> None:
        await run_async(self.flows.delete(key_id, actor=actor), self.store)

    async def authenticate(self, raw: str | Secret) -> KeyRecord:
        return await run_async(self.flows.authenticate(raw), self.store)

    async def audit(self, key_id: str | None = None, *, limit: int = 100) -> Sequence[AuditEvent]:
        return await run_async(self.flows.audit(key_id, limit=limit), self.store)
