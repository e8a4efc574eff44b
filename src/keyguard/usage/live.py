"""Where a key's limits stand right now: each window, quota and the concurrency cap.

Read with the rate store's ``peek``, which consumes nothing, for the policy the guard
would apply: the key's plan (or the default plan) with the key's overrides, plus the
windows of each service that has its own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..limiting import AsyncRateStore, LimitPolicy, LimitState, RateStore
from ..plans import Plan, ServiceLimits, resolve_policy
from ..records import KeyRecord

__all__ = ["alive_limits", "limit_dict", "live_limits", "policies_for"]


def policies_for(
    record: KeyRecord,
    plans: Mapping[str, Plan],
    services: Mapping[str, ServiceLimits] | None = None,
    default_plan: str = "free",
) -> list[LimitPolicy]:
    """The key's own policy, then one per service with windows of its own."""
    plan = plans.get(record.plan, plans.get(default_plan))
    policies = [resolve_policy(plan, record.limits)]
    for name, limits in sorted((services or {}).items()):
        if limits.rate is not None:
            policies.append(resolve_policy(plan, record.limits, name, limits))
    return policies


def _merged(found: list[LimitState], states: Sequence[LimitState]) -> None:
    names = {s.name for s in found}
    found.extend(s for s in states if s.name not in names)


def live_limits(
    limiter: RateStore,
    record: KeyRecord,
    plans: Mapping[str, Plan],
    *,
    services: Mapping[str, ServiceLimits] | None = None,
    default_plan: str = "free",
) -> tuple[LimitState, ...]:
    """Every limit of ``record`` as it stands, without charging anything."""
    found: list[LimitState] = []
    for policy in policies_for(record, plans, services, default_plan):
        if not policy.is_empty():
            _merged(found, limiter.peek(record.id, policy))
    return tuple(found)


async def alive_limits(
    limiter: AsyncRateStore,
    record: KeyRecord,
    plans: Mapping[str, Plan],
    *,
    services: Mapping[str, ServiceLimits] | None = None,
    default_plan: str = "free",
) -> tuple[LimitState, ...]:
    """The async :func:`live_limits`."""
    found: list[LimitState] = []
    for policy in policies_for(record, plans, services, default_plan):
        if not policy.is_empty():
            _merged(found, await limiter.apeek(record.id, policy))
    return tuple(found)


def limit_dict(state: LimitState, now: float) -> dict[str, Any]:
    """A limit as JSON: used and remaining, and when it resets (epoch seconds)."""
    return {
        "name": state.name,
        "kind": str(state.kind),
        "limit": state.limit,
        "used": max(0, state.limit - state.remaining),
        "remaining": max(0, state.remaining),
        "reset_after": round(state.reset_after, 3),
        "reset_at": round(now + state.reset_after, 3),
        "window_seconds": state.window_seconds,
    }
