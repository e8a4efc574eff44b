"""Plans and per-service limits, and how they combine with a key's overrides.

A plan gives every key its default windows, quotas and concurrency cap; a key's
:class:`~keyguard.records.LimitOverrides` replace individual values; a service (the
scope a route needs) can cost more than one unit and carry windows of its own,
counted per key and service. The result is one :class:`LimitPolicy`, cached because
it depends only on these frozen values.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import lru_cache

from .errors import ConfigurationError, InvalidInput
from .limiting import LimitPolicy
from .records import LimitOverrides
from .validation import validate_rate
from .windows import policy_from_strings

__all__ = ["DEFAULT_PLANS", "Plan", "ServiceLimits", "resolve_policy"]


@dataclass(frozen=True, slots=True)
class Plan:
    """Default limits for the keys on a plan; ``None`` means "no such limit"."""

    name: str
    rate: str | None = None
    quota_daily: int | None = None
    quota_monthly: int | None = None
    concurrency: int | None = None

    def __post_init__(self) -> None:
        if self.rate is not None:
            try:
                validate_rate(self.rate)
            except InvalidInput as exc:
                raise ConfigurationError(f"plan {self.name!r}: {exc.reason}") from None


@dataclass(frozen=True, slots=True)
class ServiceLimits:
    """What a service costs in quota units, and windows counted per key and service."""

    cost: int = 1
    rate: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.cost, bool) or not isinstance(self.cost, int) or self.cost < 0:
            raise ConfigurationError("a service cost is a whole number of units, 0 or more")
        if self.rate is not None:
            try:
                validate_rate(self.rate)
            except InvalidInput as exc:
                raise ConfigurationError(f"service limits: {exc.reason}") from None


DEFAULT_PLANS: Mapping[str, Plan] = {
    "free": Plan("free", "60/minute;1000/hour;10000/day", None, 100_000, 5),
    "basic": Plan("basic", "300/minute;10000/hour;100000/day", None, 1_000_000, 20),
    "premium": Plan("premium", "1200/minute;50000/hour;1000000/day", None, 10_000_000, 50),
    "enterprise": Plan("enterprise", "6000/minute;300000/hour;5000000/day", None, None, 200),
}


@lru_cache(maxsize=4096)
def resolve_policy(
    plan: Plan | None,
    overrides: LimitOverrides,
    service: str | None = None,
    service_limits: ServiceLimits | None = None,
) -> LimitPolicy:
    """The limits for one request: the plan's, overridden by the key's, plus the service's."""
    base = plan or Plan("none")
    own = policy_from_strings(
        overrides.rate if overrides.rate is not None else base.rate,
        overrides.quota_daily if overrides.quota_daily is not None else base.quota_daily,
        overrides.quota_monthly if overrides.quota_monthly is not None else base.quota_monthly,
        overrides.concurrency if overrides.concurrency is not None else base.concurrency,
    )
    if service is None or service_limits is None or service_limits.rate is None:
        return own
    extra = policy_from_strings(service_limits.rate, None, None, None, scope=f"svc:{service}")
    prefix = "".join(c if c.isalnum() else "-" for c in service.lower())
    windows = tuple(replace(w, name=f"{prefix}-{w.name}") for w in extra.windows)
    return LimitPolicy(own.windows + windows, own.quotas, own.concurrency)
