"""Alert configuration: what fires (:class:`AlertRules`), where it goes
(:class:`Webhook`) and how hard delivery tries (:class:`RetryPolicy`).

Every value is checked when the object is built and a bad one raises
:class:`~keyguard.errors.ConfigurationError` naming the field, so a typo fails at
start-up rather than as a silent alert that never comes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import ConfigurationError
from .model import AlertKind
from .urls import check_webhook_url

__all__ = [
    "AlertConfig",
    "AlertRules",
    "BurstRule",
    "ErrorRateRule",
    "NewIPRule",
    "OwnerAlerts",
    "RetryPolicy",
    "Webhook",
]

MIN_SECRET = 16


def _number(name: str, value: object, low: float, high: float, *, open_low: bool = False) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok and (value > low if open_low else value >= low) and value <= high:  # type: ignore[operator]
        return
    bracket = "(" if open_low else "["
    raise ConfigurationError(f"alerts: {name} must be a number in {bracket}{low}, {high}]")


def _integer(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigurationError(f"alerts: {name} must be an integer in [{low}, {high}]")


@dataclass(frozen=True, slots=True)
class ErrorRateRule:
    """Fire when at least ``share`` of a key's requests in the last ``window`` seconds
    failed (status >= 400 or refused), once ``min_requests`` were seen — so three
    failures out of four at night page nobody. At most one alert per ``cooldown``.
    """

    share: float = 0.5
    window: float = 300.0
    min_requests: int = 20
    cooldown: float = 3600.0

    def __post_init__(self) -> None:
        _number("error_rate.share", self.share, 0.0, 1.0, open_low=True)
        _number("error_rate.window", self.window, 10.0, 86400.0)
        _integer("error_rate.min_requests", self.min_requests, 1, 1_000_000)
        _number("error_rate.cooldown", self.cooldown, 0.0, 30 * 86400.0)


@dataclass(frozen=True, slots=True)
class BurstRule:
    """Fire when a key's requests in the last minute exceed ``factor`` times its
    moving average per minute, and at least ``floor``.

    ``average`` is the moving average's time constant in seconds; ``warmup`` how long
    this process must have watched the key first (without it, every busy key would
    look like a burst right after a restart). At most one alert per ``cooldown``.
    """

    factor: float = 10.0
    floor: int = 100
    average: float = 3600.0
    warmup: float = 600.0
    cooldown: float = 900.0

    def __post_init__(self) -> None:
        _number("burst.factor", self.factor, 1.0, 1e6, open_low=True)
        _integer("burst.floor", self.floor, 1, 10_000_000)
        _number("burst.average", self.average, 60.0, 30 * 86400.0)
        _number("burst.warmup", self.warmup, 0.0, 30 * 86400.0)
        _number("burst.cooldown", self.cooldown, 0.0, 30 * 86400.0)


@dataclass(frozen=True, slots=True)
class NewIPRule:
    """Fire when a key calls from an address this process has not seen it use.

    A key's first address is learnt silently (there is nothing to compare it with).
    During ``cooldown`` after an alert, new addresses are not learnt either, so one
    still calling after the cool-down is reported then rather than never.
    """

    cooldown: float = 600.0

    def __post_init__(self) -> None:
        _number("new_ip.cooldown", self.cooldown, 0.0, 30 * 86400.0)


def _thresholds(name: str, values: object, low: float, high: float) -> tuple[float, ...]:
    if not isinstance(values, tuple | list):
        raise ConfigurationError(f"alerts: {name} must be a tuple of numbers")
    for value in values:
        _number(name, value, low, high, open_low=True)
    return tuple(sorted(set(values)))


@dataclass(frozen=True, slots=True)
class AlertRules:
    """The thresholds that fire alerts; ``None`` (or ``()``) turns a rule off.

    :param quota_thresholds: shares of a daily or monthly quota, e.g. ``(0.8, 1.0)``;
        each fires at most once per key, quota and quota period.
    :param expiry_days: warn when a key expires within this many days, e.g. ``(7, 1)``;
        each fires at most once per key and expiry date.
    :param lifecycle: alert on created, rotated, revoked and expired keys.
    """

    quota_thresholds: tuple[float, ...] = (0.8, 1.0)
    expiry_days: tuple[float, ...] = (7, 1)
    error_rate: ErrorRateRule | None = field(default_factory=ErrorRateRule)
    new_ip: NewIPRule | None = field(default_factory=NewIPRule)
    burst: BurstRule | None = field(default_factory=BurstRule)
    lifecycle: bool = True

    def __post_init__(self) -> None:
        quota = _thresholds("quota_thresholds", self.quota_thresholds, 0.0, 1.0)
        object.__setattr__(self, "quota_thresholds", quota)
        days = _thresholds("expiry_days", self.expiry_days, 0.0, 3650.0)
        object.__setattr__(self, "expiry_days", days)
        for name, kind in (("error_rate", ErrorRateRule), ("new_ip", NewIPRule)):
            value = getattr(self, name)
            if value is not None and not isinstance(value, kind):
                raise ConfigurationError(f"alerts: {name} must be a {kind.__name__} or None")
        if self.burst is not None and not isinstance(self.burst, BurstRule):
            raise ConfigurationError("alerts: burst must be a BurstRule or None")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How a webhook delivery is retried: ``attempts`` in all (the retry budget),
    waits growing as ``base * 2**n`` up to ``cap`` seconds with jitter, and at most
    ``timeout`` seconds per socket operation of one attempt.
    """

    attempts: int = 5
    base: float = 0.5
    cap: float = 30.0
    timeout: float = 5.0

    def __post_init__(self) -> None:
        _integer("retry.attempts", self.attempts, 1, 20)
        _number("retry.base", self.base, 0.0, 60.0, open_low=True)
        _number("retry.cap", self.cap, self.base, 3600.0)
        _number("retry.timeout", self.timeout, 0.0, 60.0, open_low=True)

    def delay(self, attempts: int, jitter: float) -> float:
        """The wait after ``attempts`` failed attempts; ``jitter`` in [0, 1).

        Half the wait is fixed and half random ("equal jitter"): receivers that come
        back up are not hit by every sender at the same instant, and no wait is ~0.
        """
        ceiling = min(self.cap, self.base * 2.0 ** min(attempts - 1, 30))
        return ceiling / 2 + ceiling / 2 * jitter


@dataclass(frozen=True, slots=True)
class Webhook:
    """A receiver of alerts: an http(s) URL and the secret the body is signed with.

    ``kinds`` narrows what is sent (empty: everything). ``allow_private`` lets the
    URL point at loopback, private or link-local addresses; leave it off for any URL
    a key owner typed in (SSRF: see ``docs/alerts.md``).

    **Security note:** the secret is kept out of ``repr``; rotate it by adding a
    second webhook with the new secret, then removing the old one.
    """

    url: str
    secret: str = field(repr=False)
    kinds: frozenset[AlertKind] = frozenset()
    allow_private: bool = False

    def __post_init__(self) -> None:
        check_webhook_url(self.url, allow_private=self.allow_private)
        if not isinstance(self.secret, str) or len(self.secret) < MIN_SECRET:
            raise ConfigurationError(
                f"alerts: a webhook secret must be a string of at least {MIN_SECRET} characters"
            )
        try:
            kinds = frozenset(AlertKind(kind) for kind in self.kinds)
        except (TypeError, ValueError):
            known = ", ".join(kind.value for kind in AlertKind)
            raise ConfigurationError(f"alerts: webhook kinds must be among {known}") from None
        object.__setattr__(self, "kinds", kinds)

    def wants(self, kind: AlertKind) -> bool:
        return not self.kinds or kind in self.kinds


@dataclass(frozen=True, slots=True)
class OwnerAlerts:
    """One owner's own settings: their webhooks, and thresholds replacing the global
    ones for their keys (``None``: the global :attr:`AlertConfig.rules`)."""

    webhooks: tuple[Webhook, ...] = ()
    rules: AlertRules | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "webhooks", tuple(self.webhooks))
        if not all(isinstance(hook, Webhook) for hook in self.webhooks):
            raise ConfigurationError("alerts: owner webhooks must be Webhook values")
        if self.rules is not None and not isinstance(self.rules, AlertRules):
            raise ConfigurationError("alerts: owner rules must be AlertRules or None")


@dataclass(frozen=True, slots=True)
class AlertConfig:
    """Everything :class:`~keyguard.alerts.Alerts` needs, validated once.

    :param rules: the thresholds for keys whose owner set none.
    :param webhooks: the operator's receivers; they get every owner's alerts.
    :param retry: delivery attempts, backoff and per-attempt timeout.
    :param queue_size: alerts (and webhook deliveries) waiting at most; beyond it new
        ones are dropped and counted, so a dead receiver cannot grow memory.
    :param history_size: delivery records kept per owner for the dashboard.
    :param max_keys: keys each rule tracks at most (least recently used forgotten).
    :param ips_per_key: addresses remembered per key by the new-IP rule.
    :param ipv6_prefix: IPv6 addresses are compared by this prefix, since clients
        rotate the low bits (privacy addresses) and each would look new.
    :param expired_lookback: a scan reports a key as expired only if it expired at
        most this many seconds ago, so a restart does not re-announce old keys.
    :param allow_private_owner_webhooks: let owners register webhooks on private
        addresses (tests, single-tenant deployments).
    """

    rules: AlertRules = field(default_factory=AlertRules)
    webhooks: tuple[Webhook, ...] = ()
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    queue_size: int = 1000
    history_size: int = 100
    max_keys: int = 100_000
    ips_per_key: int = 64
    ipv6_prefix: int = 64
    expired_lookback: float = 86400.0
    allow_private_owner_webhooks: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.rules, AlertRules):
            raise ConfigurationError("alerts: rules must be an AlertRules")
        if not isinstance(self.retry, RetryPolicy):
            raise ConfigurationError("alerts: retry must be a RetryPolicy")
        object.__setattr__(self, "webhooks", tuple(self.webhooks))
        if not all(isinstance(hook, Webhook) for hook in self.webhooks):
            raise ConfigurationError("alerts: webhooks must be Webhook values")
        _integer("queue_size", self.queue_size, 1, 1_000_000)
        _integer("history_size", self.history_size, 1, 10_000)
        _integer("max_keys", self.max_keys, 1, 10_000_000)
        _integer("ips_per_key", self.ips_per_key, 1, 10_000)
        _integer("ipv6_prefix", self.ipv6_prefix, 16, 128)
        _number("expired_lookback", self.expired_lookback, 0.0, 365 * 86400.0)
