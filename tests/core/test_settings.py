"""KeyGuardSettings: defaults, validation, sources and their precedence, secrecy."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from keyguard import ConfigurationError, KeyFormat, KeyHasher, Secret
from keyguard.backends import KeyBackend
from keyguard.backends.memory import MemoryKeyStore
from keyguard.settings import (
    DEFAULT_PLANS,
    KeyGuardSettings,
    PlanSettings,
    describe_settings_error,
    load_settings,
)
from keyguard.testing import FakeClock

pytestmark = pytest.mark.usefixtures("clean_env")

PEPPER = "a-pepper-nobody-guesses-42"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --- defaults -------------------------------------------------------------------------


def test_defaults_are_the_embedded_deployment() -> None:
    settings = KeyGuardSettings()
    assert settings.storage_url == "sqlite:///keyguard.db"
    assert settings.key_prefix == "kg"
    assert settings.key_environments == ("live", "test")
    assert settings.pepper is None
    assert settings.rotation_grace == timedelta(hours=24)
    assert list(settings.plans) == ["free", "basic", "premium", "enterprise"]
    assert settings.default_plan == "free"


def test_default_plans_escalate() -> None:
    plans = list(DEFAULT_PLANS.values())
    per_minute = [int((p.rate or "0").split("/")[0]) for p in plans]
    assert per_minute == sorted(per_minute)
    assert len(set(per_minute)) == len(per_minute)
    assert all(p.concurrency for p in plans)
    assert [p.concurrency for p in plans] == sorted(p.concurrency or 0 for p in plans)
    assert DEFAULT_PLANS["enterprise"].quota_monthly is None


def test_default_plans_match_the_limit_engines_table() -> None:
    from keyguard import plans

    def numbers(plan: Any) -> tuple[Any, ...]:
        return (plan.rate, plan.quota_daily, plan.quota_monthly, plan.concurrency)

    assert {n: numbers(p) for n, p in DEFAULT_PLANS.items()} == {
        n: numbers(p) for n, p in plans.DEFAULT_PLANS.items()
    }


def test_settings_are_frozen() -> None:
    settings = KeyGuardSettings()
    with pytest.raises(ValidationError):
        settings.key_prefix = "other"


# --- values ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1h", timedelta(hours=1)),
        ("30m", timedelta(minutes=30)),
        ("1h30m", timedelta(minutes=90)),
        ("3600", timedelta(hours=1)),
        (90, timedelta(seconds=90)),
        ("0", timedelta(0)),
        ("PT2H", timedelta(hours=2)),
        (timedelta(days=2), timedelta(days=2)),
    ],
)
def test_rotation_grace_reads_durations_and_seconds(value: object, expected: timedelta) -> None:
    assert KeyGuardSettings(rotation_grace=value).rotation_grace == expected  # type: ignore[arg-type]


def test_key_environments_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYGUARD_KEY_ENVIRONMENTS", "prod, staging")
    assert KeyGuardSettings().key_environments == ("prod", "staging")
    monkeypatch.setenv("KEYGUARD_KEY_ENVIRONMENTS", '["dev"]')
    assert KeyGuardSettings().key_environments == ("dev",)


def test_plan_rates_are_normalised() -> None:
    plan = PlanSettings(rate="5 per minute; 100/hour")
    assert plan.rate == "5/minute;100/hour"


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"storage_url": "keyguard.db"}, "storage_url"),
        ({"key_prefix": "KG"}, "key_prefix"),
        ({"key_prefix": "kg_x"}, "key_prefix"),
        ({"key_prefix": ""}, "key_prefix"),
        ({"key_environments": ("Live",)}, "key_environments"),
        ({"key_environments": ()}, "key_environments"),
        ({"key_environments": ("live", "live")}, "key_environments"),
        ({"pepper": "too-short"}, "pepper"),
        ({"rotation_grace": "soon"}, "rotation_grace"),
        ({"rotation_grace": -1}, "rotation_grace"),
        ({"default_plan": "gold"}, "default_plan"),
        ({"plans": {"free": {"rate": "often"}}}, "plans.free.rate"),
        ({"plans": {"free": {"quota_daily": 0}}}, "plans.free.quota_daily"),
        ({"plans": {"free": {"concurrency": "many"}}}, "plans.free.concurrency"),
        ({"plans": {"gold": {"quota_daily": 0}}}, "plans.gold.quota_daily"),
        ({"plans": {"Gold Plan": {"rate": "1/second"}}}, "plans"),
        ({"plans": {"free": {"rate": "1/second", "colour": "red"}}}, "plans.free.colour"),
        ({"no_such_setting": 1}, "no_such_setting"),
    ],
)
def test_invalid_values_name_the_field(values: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        KeyGuardSettings(**values)
    locations = [".".join(map(str, e["loc"])) for e in caught.value.errors()]
    assert field in locations
    message = describe_settings_error(caught.value)
    assert f"setting {field}" in message
    assert "\n" not in message


def test_default_plan_may_name_a_new_plan() -> None:
    settings = KeyGuardSettings(plans={"gold": {"rate": "1/second"}}, default_plan="gold")  # type: ignore[dict-item]
    assert settings.plans["gold"] == PlanSettings(rate="1/second")
    assert set(settings.plans) == {"free", "basic", "premium", "enterprise", "gold"}


# --- the pepper stays secret ----------------------------------------------------------


def test_the_pepper_is_never_shown() -> None:
    settings = KeyGuardSettings(pepper=PEPPER)  # type: ignore[arg-type]
    for text in (repr(settings), str(settings), settings.model_dump_json()):
        assert PEPPER not in text
    assert settings.pepper is not None
    assert settings.pepper.get_secret_value() == PEPPER


@pytest.mark.parametrize(
    "values",
    [
        {"pepper": "short-pepper"},
        {"pepper": PEPPER, "key_prefix": "BAD"},
        {"pepper": PEPPER, "plans": {"free": {"rate": "whenever"}}},
    ],
)
def test_errors_never_contain_the_pepper(values: dict[str, Any]) -> None:
    pepper = values["pepper"]
    with pytest.raises(ValidationError) as caught:
        KeyGuardSettings(**values)
    for text in (str(caught.value), repr(caught.value), describe_settings_error(caught.value)):
        assert pepper not in text


def test_an_environment_pepper_is_not_echoed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYGUARD_PEPPER", "env-short")
    with pytest.raises(ValidationError) as caught:
        load_settings()
    assert "env-short" not in str(caught.value)
    assert describe_settings_error(caught.value) == (
        "invalid setting pepper: must be at least 16 bytes"
    )


# --- sources and precedence -----------------------------------------------------------


def test_the_class_does_not_read_dotenv_but_load_settings_does(clean_env: Path) -> None:
    write(clean_env / ".env", "KEYGUARD_KEY_PREFIX=fromdotenv\n")
    assert KeyGuardSettings().key_prefix == "kg"
    assert load_settings().key_prefix == "fromdotenv"
    assert load_settings(env_file=None).key_prefix == "kg"


def test_precedence_toml_dotenv_environment_overrides(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    toml = write(
        clean_env / "keyguard.toml",
        'key_prefix = "toml"\nstorage_url = "memory://"\nrotation_grace = "2h"\n'
        'default_plan = "basic"\n',
    )
    settings = load_settings(toml_file=toml)
    assert (settings.key_prefix, settings.storage_url) == ("toml", "memory://")
    assert settings.rotation_grace == timedelta(hours=2)
    assert settings.default_plan == "basic"
    assert settings.config_file == toml

    write(clean_env / ".env", "KEYGUARD_KEY_PREFIX=dotenv\nKEYGUARD_ROTATION_GRACE=30m\n")
    settings = load_settings(toml_file=toml)
    assert settings.key_prefix == "dotenv"
    assert settings.rotation_grace == timedelta(minutes=30)
    assert settings.storage_url == "memory://"

    monkeypatch.setenv("KEYGUARD_KEY_PREFIX", "environ")
    settings = load_settings(toml_file=toml)
    assert settings.key_prefix == "environ"
    assert settings.rotation_grace == timedelta(minutes=30)

    settings = load_settings(toml_file=toml, key_prefix="override")
    assert settings.key_prefix == "override"
    assert settings.default_plan == "basic"


def test_config_file_named_by_the_environment_or_dotenv(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(clean_env / "a.toml", 'key_prefix = "fromenv"\n')
    write(clean_env / "b.toml", 'key_prefix = "fromdotenv"\n')
    write(clean_env / ".env", "KEYGUARD_CONFIG_FILE=b.toml\n")
    assert load_settings().key_prefix == "fromdotenv"
    monkeypatch.setenv("KEYGUARD_CONFIG_FILE", "a.toml")
    assert load_settings().key_prefix == "fromenv"
    assert load_settings(toml_file=clean_env / "b.toml").key_prefix == "fromdotenv"


def test_plans_merge_over_the_defaults_field_by_field(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    toml = write(
        clean_env / "keyguard.toml",
        '[plans.gold]\nrate = "5/second"\nconcurrency = 50\n\n[plans.free]\nconcurrency = 1\n',
    )
    monkeypatch.setenv("KEYGUARD_PLANS__FREE__RATE", "7/minute")
    monkeypatch.setenv("KEYGUARD_PLANS__ENTERPRISE__CONCURRENCY", "null")
    plans = load_settings(toml_file=toml).plans
    assert plans["gold"] == PlanSettings(rate="5/second", concurrency=50)
    assert plans["free"] == PlanSettings(
        rate="7/minute",
        quota_daily=DEFAULT_PLANS["free"].quota_daily,
        quota_monthly=DEFAULT_PLANS["free"].quota_monthly,
        concurrency=1,
    )
    assert plans["enterprise"].concurrency is None
    assert plans["basic"] == DEFAULT_PLANS["basic"]


def test_dotenv_keeps_other_tools_variables_but_refuses_typos(clean_env: Path) -> None:
    write(clean_env / ".env", "DATABASE_URL=postgres://x\nKEYGUARD_KEY_PREFIX=ok\n")
    assert load_settings().key_prefix == "ok"
    write(clean_env / ".env", "KEYGUARD_KEY_PREFX=typo\n")
    with pytest.raises(ValidationError) as caught:
        load_settings()
    assert describe_settings_error(caught.value) == "unknown setting keyguard_key_prefx"


def test_bad_files_are_configuration_errors(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigurationError, match="does not exist"):
        load_settings(toml_file=clean_env / "missing.toml")
    bad = write(clean_env / "bad.toml", "key_prefix = \n")
    with pytest.raises(ConfigurationError, match="not valid TOML"):
        load_settings(toml_file=bad)
    monkeypatch.setenv("KEYGUARD_PLANS", "{not json")
    with pytest.raises(ConfigurationError, match="plans"):
        load_settings()


def test_an_invalid_toml_value_names_the_field(clean_env: Path) -> None:
    toml = write(clean_env / "keyguard.toml", '[plans.free]\nrate = "whenever"\n')
    with pytest.raises(ValidationError) as caught:
        load_settings(toml_file=toml)
    assert describe_settings_error(caught.value).startswith("invalid setting plans.free.rate:")


# --- helpers --------------------------------------------------------------------------


def test_key_format_and_hasher_follow_the_settings() -> None:
    settings = KeyGuardSettings(key_prefix="acme", key_environments=("prod",), pepper=PEPPER)  # type: ignore[arg-type]
    key_format = settings.key_format()
    assert key_format == KeyFormat(prefix="acme", environments=("prod",))
    key = key_format.generate()
    assert settings.hasher().digest(key) == KeyHasher(PEPPER).digest(key)
    assert KeyGuardSettings().hasher().digest(key) == KeyHasher().digest(key)
    assert PEPPER not in repr(settings.hasher())


def test_open_store_and_manager() -> None:
    settings = KeyGuardSettings(storage_url="memory://", key_prefix="acme", rotation_grace="1h")  # type: ignore[arg-type]
    store = settings.open_store()
    assert isinstance(store, KeyBackend)
    clock = FakeClock()
    manager = settings.manager(MemoryKeyStore(), clock)
    issued = manager.create("svc")
    assert issued.key.reveal().startswith("acme_live_")
    assert issued.record.created_at == clock.datetime()
    rotated = manager.rotate(issued.record.id)
    old = [d for d in rotated.record.digests if d.valid_until is not None]
    assert [d.valid_until for d in old] == [clock.datetime() + timedelta(hours=1)]
    assert manager.authenticate(Secret(issued.key.reveal())).id == issued.record.id
    assert settings.manager(actor="ops").flows.actor == "ops"


def test_usage_and_alert_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Usage retention reads durations; alert thresholds read comma lists; the webhook
    and its secret become the operator's signed receiver (the secret never shown)."""
    monkeypatch.setenv("KEYGUARD_USAGE_RETENTION_MINUTES", "6h")
    monkeypatch.setenv("KEYGUARD_ALERT_QUOTA_THRESHOLDS", "0.5, 0.9,1")
    monkeypatch.setenv("KEYGUARD_ALERT_EXPIRY_DAYS", "[14, 3]")
    monkeypatch.setenv("KEYGUARD_ALERT_WEBHOOK_URL", "https://hooks.example.com/keyguard")
    monkeypatch.setenv("KEYGUARD_ALERT_WEBHOOK_SECRET", "whsec-0123456789abcdef")
    settings = KeyGuardSettings()
    assert settings.usage_retention().minute == 6 * 3600
    config = settings.alert_config()
    assert config.rules.quota_thresholds == (0.5, 0.9, 1.0)
    assert sorted(config.rules.expiry_days) == [3.0, 14.0]
    (webhook,) = config.webhooks
    assert webhook.url == "https://hooks.example.com/keyguard"
    assert "whsec" not in repr(settings) + repr(config)


@pytest.mark.parametrize(
    "values",
    [
        {"alert_webhook_url": "https://hooks.example.com/x"},
        {"alert_webhook_url": "ftp://hooks.example.com/x", "alert_webhook_secret": "s" * 20},
        {"alert_quota_thresholds": (1.5,)},
    ],
)
def test_bad_alert_settings_are_configuration_errors(values: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        KeyGuardSettings(**values).alert_config()


@pytest.mark.parametrize("value", ["30m", "4000d"])
def test_usage_retention_has_bounds(value: str) -> None:
    with pytest.raises(ValidationError):
        KeyGuardSettings(usage_retention_days=value)  # type: ignore[arg-type]
