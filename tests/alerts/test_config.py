"""Alert configuration is validated at construction with clear ConfigurationErrors."""

from __future__ import annotations

from typing import Any

import pytest

from keyguard.alerts import (
    AlertConfig,
    AlertKind,
    AlertRegistry,
    AlertRules,
    BurstRule,
    ErrorRateRule,
    NewIPRule,
    OwnerAlerts,
    RetryPolicy,
    Webhook,
)
from keyguard.errors import ConfigurationError

from .conftest import SECRET


def untyped(value: object) -> Any:
    """A wrongly typed value, as configuration read from a file could hold."""
    return value


def test_defaults_are_valid_and_sorted() -> None:
    """The defaults build, and thresholds are stored sorted and deduplicated."""
    config = AlertConfig()
    assert config.rules.quota_thresholds == (0.8, 1.0)
    rules = AlertRules(quota_thresholds=(1.0, 0.5, 0.5), expiry_days=(7, 30, 1))
    assert rules.quota_thresholds == (0.5, 1.0)
    assert rules.expiry_days == (1, 7, 30)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: AlertRules(quota_thresholds=(0.8, 1.5)), "quota_thresholds"),
        (lambda: AlertRules(quota_thresholds=(0,)), "quota_thresholds"),
        (lambda: AlertRules(quota_thresholds=untyped(0.8)), "quota_thresholds"),
        (lambda: AlertRules(expiry_days=(-1,)), "expiry_days"),
        (lambda: AlertRules(error_rate=untyped("high")), "error_rate"),
        (lambda: AlertRules(burst=untyped(3)), "burst"),
        (lambda: ErrorRateRule(share=0), "error_rate.share"),
        (lambda: ErrorRateRule(window=1), "error_rate.window"),
        (lambda: ErrorRateRule(min_requests=0), "error_rate.min_requests"),
        (lambda: ErrorRateRule(min_requests=True), "error_rate.min_requests"),
        (lambda: BurstRule(factor=1), "burst.factor"),
        (lambda: BurstRule(floor=0), "burst.floor"),
        (lambda: BurstRule(average=float("nan")), "burst.average"),
        (lambda: NewIPRule(cooldown=-1), "new_ip.cooldown"),
        (lambda: RetryPolicy(attempts=0), "retry.attempts"),
        (lambda: RetryPolicy(base=0), "retry.base"),
        (lambda: RetryPolicy(base=2, cap=1), "retry.cap"),
        (lambda: RetryPolicy(timeout=0), "retry.timeout"),
        (lambda: AlertConfig(queue_size=0), "queue_size"),
        (lambda: AlertConfig(history_size=10**6), "history_size"),
        (lambda: AlertConfig(ipv6_prefix=8), "ipv6_prefix"),
        (lambda: AlertConfig(rules=untyped(None)), "rules"),
        (lambda: AlertConfig(retry=untyped({})), "retry"),
        (lambda: AlertConfig(webhooks=untyped(("https://example.com",))), "webhooks"),
        (lambda: OwnerAlerts(webhooks=untyped(("https://example.com",))), "webhooks"),
        (lambda: OwnerAlerts(rules=untyped({})), "rules"),
    ],
)
def test_bad_values_name_the_field(build: Any, message: str) -> None:
    """Each bad value raises ConfigurationError naming the field."""
    with pytest.raises(ConfigurationError, match=message.replace(".", r"\.")):
        build()


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/hook",
        "file:///etc/passwd",
        "https://user:pass@example.com/hook",
        "https:///nohost",
        "https://example.com/hook#frag",
        "https://example.com/a b",
        "https://example.com:99999/",
        "http://127.0.0.1/hook",
        "http://10.1.2.3/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]/hook",
        "http://[::ffff:127.0.0.1]/hook",
        "http://localhost:8080/hook",
        "http://metadata.internal/",
        "",
        "https://example.com/" + "a" * 3000,
    ],
)
def test_webhook_urls_refused(url: str) -> None:
    """Non-http(s), credential-bearing, malformed and private-address URLs are refused,
    and the message never echoes the URL (a webhook path is often a token)."""
    with pytest.raises(ConfigurationError) as info:
        Webhook(url, SECRET)
    assert url not in str(info.value) or not url


def test_private_urls_allowed_when_asked() -> None:
    """An operator can aim a webhook at an internal receiver explicitly."""
    hook = Webhook("http://10.1.2.3:8080/hook", SECRET, allow_private=True)
    assert hook.allow_private


def test_webhook_secret_is_checked_and_hidden() -> None:
    """A short secret is refused; the secret never shows in repr."""
    with pytest.raises(ConfigurationError, match="secret"):
        Webhook("https://example.com/hook", "short")
    hook = Webhook("https://example.com/hook", SECRET)
    assert SECRET not in repr(hook)
    assert SECRET not in repr(AlertConfig(webhooks=(hook,)))


def test_webhook_kinds_filter() -> None:
    """Kinds are validated and narrow what a webhook is sent."""
    hook = Webhook("https://example.com/hook", SECRET, kinds=frozenset({"key.revoked"}))  # type: ignore[arg-type]
    assert hook.wants(AlertKind.REVOKED)
    assert not hook.wants(AlertKind.QUOTA)
    assert Webhook("https://example.com/h", SECRET).wants(AlertKind.QUOTA)
    with pytest.raises(ConfigurationError, match="kinds"):
        Webhook("https://example.com/h", SECRET, kinds=frozenset({"nope"}))  # type: ignore[arg-type]


def test_retry_delay_grows_to_the_cap_with_equal_jitter() -> None:
    """Waits double per attempt, stay within [half, full] of the ceiling, and cap."""
    policy = RetryPolicy(attempts=8, base=0.5, cap=4.0)
    assert [policy.delay(n, 1.0) for n in range(1, 6)] == [0.5, 1.0, 2.0, 4.0, 4.0]
    assert [policy.delay(n, 0.0) for n in range(1, 4)] == [0.25, 0.5, 1.0]
    assert policy.delay(1000, 0.5) <= 4.0


def test_registry_get_set_delete() -> None:
    """Owners get their own webhooks and thresholds; private targets need permission."""
    registry = AlertRegistry()
    default = AlertRules()
    assert registry.get("alice") == OwnerAlerts()
    mine = AlertRules(quota_thresholds=(0.5,))
    hook = Webhook("https://alice.example.com/hook", SECRET)
    registry.set("alice", OwnerAlerts(webhooks=(hook,), rules=mine))
    assert registry.rules_for("alice", default) is mine
    assert registry.rules_for("bob", default) is default
    assert registry.rules_for(None, default) is default
    assert registry.webhooks_for("alice") == (hook,)
    assert registry.webhooks_for(None) == ()
    private = Webhook("http://10.0.0.1/hook", SECRET, allow_private=True)
    with pytest.raises(ConfigurationError, match="private"):
        registry.set("alice", OwnerAlerts(webhooks=(private,)))
    with pytest.raises(ConfigurationError, match="owner"):
        registry.set("", OwnerAlerts())
    with pytest.raises(ConfigurationError, match="OwnerAlerts"):
        registry.set("alice", {})  # type: ignore[arg-type]
    registry.delete("alice")
    assert registry.rules_for("alice", default) is default
    AlertRegistry(allow_private=True).set("alice", OwnerAlerts(webhooks=(private,)))
