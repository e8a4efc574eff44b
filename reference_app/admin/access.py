"""Who may do what with which key: the tenant rules of the key API.

- A caller whose key grants ``admin`` sees every owner's keys and may grant anything.
- Any other caller (``keys:self``) sees only keys of its own owner (only its own key
  when it has no owner); other keys answer 404, exactly as keys that do not exist,
  so ids cannot be probed across tenants. It may grant only scopes its credential
  holds, and only limits at least as strict as its own, window by window.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from keyguard import (
    AsyncKeyManager,
    Identity,
    InvalidInput,
    KeyNotFound,
    KeyRecord,
    LimitOverrides,
    Plan,
)
from keyguard.limiting import LimitPolicy
from keyguard.oauth.claims import scope_covers
from keyguard.plans import resolve_policy
from keyguard.scopes import scope_allows
from keyguard.validation import validate_limits

from ..catalogue import ADMIN_SCOPE
from ..errors import ApiError

__all__ = ["Actor", "load_actor", "not_found", "validated_limits", "within"]


def not_found() -> ApiError:
    return ApiError(404, "key_not_found", "No such key.", param="key_id")


def refused(code: str, message: str, param: str) -> ApiError:
    return ApiError(403, code, message, param=param)


@dataclass(frozen=True, slots=True)
class Actor:
    """The caller of the key API, with its own key's record (for its limits)."""

    identity: Identity
    record: KeyRecord

    @property
    def admin(self) -> bool:
        return scope_allows(self.identity.scopes, ADMIN_SCOPE)

    @property
    def name(self) -> str:
        """How the audit trail names this caller."""
        return "key:" + self.identity.key_id

    def sees(self, record: KeyRecord) -> bool:
        if self.admin or record.id == self.identity.key_id:
            return True
        return self.identity.owner is not None and record.owner == self.identity.owner

    def visible(self, record: KeyRecord) -> KeyRecord:
        if not self.sees(record):
            raise not_found()
        return record

    def owner_for_new_key(self, asked: str | None) -> str | None:
        if self.admin:
            return asked
        if self.identity.owner is None:
            raise refused("owner_required", "A key without an owner manages only itself.", "owner")
        if asked is not None and asked != self.identity.owner:
            raise refused("owner_not_allowed", "Keys can be made only for your own owner.", "owner")
        return self.identity.owner

    def check_scopes(self, scopes: Iterable[str]) -> None:
        if self.admin:
            return
        for scope in scopes:
            if not scope_covers(self.identity.scopes, scope):
                raise refused(
                    "scope_not_grantable", "A key cannot grant a scope it lacks.", "scopes"
                )

    def check_limits(
        self, plans: Mapping[str, Plan], plan: str, limits: LimitOverrides, fallback: str
    ) -> None:
        """Refuse an unknown plan, and (for a non-admin) limits looser than its own."""
        if plan not in plans:
            raise ApiError(400, "invalid_value", "No such plan.", param="plan")
        limits = validated_limits(limits)
        if self.admin:
            return
        mine = resolve_policy(plans.get(self.record.plan, plans.get(fallback)), self.record.limits)
        theirs = resolve_policy(plans[plan], limits)
        if not within(theirs, mine):
            raise refused(
                "limits_not_grantable", "A key cannot grant limits beyond its own.", "limits"
            )


def validated_limits(limits: LimitOverrides) -> LimitOverrides:
    """``limits`` checked by keyguard's own rules, or 400 naming the field."""
    try:
        return validate_limits(limits)
    except InvalidInput as exc:
        raise ApiError(400, "invalid_value", exc.reason, param="limits." + exc.field) from None


def within(theirs: LimitPolicy, mine: LimitPolicy) -> bool:
    """Whether ``theirs`` is at least as strict as ``mine`` on every limit ``mine`` has:
    a window of the same length with no higher limit, a quota of the same period no
    higher, a concurrency cap no higher."""
    for window in mine.windows:
        if not any(w.seconds == window.seconds and w.limit <= window.limit for w in theirs.windows):
            return False
    for quota in mine.quotas:
        if not any(q.period == quota.period and q.limit <= quota.limit for q in theirs.quotas):
            return False
    return mine.concurrency is None or (
        theirs.concurrency is not None and theirs.concurrency <= mine.concurrency
    )


async def load_actor(manager: AsyncKeyManager, identity: Identity) -> Actor:
    """The actor for ``identity``; a caller with no key record (an outside OAuth
    client) may not use the key API."""
    try:
        record = await manager.get(identity.key_id)
    except KeyNotFound:
        raise refused("key_required", "The key API needs an API key.", "key") from None
    return Actor(identity, record)
