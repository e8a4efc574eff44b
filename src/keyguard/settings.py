"""Deployment settings, read from code, a TOML file, ``.env`` and ``KEYGUARD_*`` variables.

:class:`KeyGuardSettings` is a pydantic-settings model. Built in code it reads only its
arguments and ``KEYGUARD_*`` environment variables; :func:`load_settings` is the one
entry point that also reads files, in this order of increasing precedence::

    defaults < TOML file < .env < environment < explicit overrides

Nested values use ``__``: ``KEYGUARD_PLANS__FREE__RATE="30/minute"`` changes one field
of one plan. Plans given anywhere are merged over the built-in ones field by field, so a
partial change never drops the other plans or the other limits of that plan.

Every bad value fails with a :class:`pydantic.ValidationError` naming the field;
:func:`describe_settings_error` turns one into a single line for a CLI or a log.

**Security note**: the pepper is a :class:`~pydantic.SecretStr` and the model hides
input values in its errors, so neither ``repr``, ``str`` nor an error message shows it.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Literal, TypeVar

from dotenv import dotenv_values
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from .alerts.config import AlertConfig, AlertRules, Webhook
from .backends.protocols import KeyBackend, KeyStore
from .backends.registry import open_key_store, open_usage_store
from .clock import Clock
from .credentials import CredentialConfig, CredentialMethod
from .errors import ConfigurationError, InvalidInput, shown
from .keys import KeyFormat, KeyHasher
from .manager import KeyManager
from .plans import DEFAULT_PLANS as CORE_PLANS
from .plans import Plan
from .usage.recorder import Retention
from .usage.store import UsageBackend
from .validation import parse_duration, validate_cidrs, validate_plan, validate_rate

__all__ = [
    "DEFAULT_PLANS",
    "KeyGuardSettings",
    "PlanSettings",
    "describe_settings_error",
    "load_settings",
]

_V = TypeVar("_V")
_R = TypeVar("_R")
CONFIG_FILE_VAR = "KEYGUARD_CONFIG_FILE"
_URL = re.compile(r"[a-z][a-z0-9+.\-]*://.*", re.DOTALL)
_MIN_PEPPER_BYTES = 16
# The TOML file load_settings() asked for; None means "read no TOML file".
_TOML_FILE: ContextVar[Path | None] = ContextVar("keyguard_toml_file", default=None)


def _checked(validator: Callable[[_V], _R], value: _V) -> _R:
    """Run a keyguard validator, re-raising its reason as a plain ``ValueError``.

    pydantic already names the field in the error's location, so the ``field:`` part of
    :class:`InvalidInput` would only repeat it.
    """
    try:
        return validator(value)
    except InvalidInput as exc:
        raise ValueError(exc.reason) from None


class PlanSettings(BaseModel):
    """The limits a plan gives its keys unless a key overrides them.

    :param rate: windows in the ``limits`` grammar, e.g. ``60/minute;1000/hour``.
    :param quota_daily: units per UTC day, or ``None`` for no daily quota.
    :param quota_monthly: units per UTC calendar month, or ``None``.
    :param concurrency: requests in flight per key, or ``None`` for no cap.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    rate: str | None = None
    quota_daily: Annotated[int, Field(ge=1)] | None = None
    quota_monthly: Annotated[int, Field(ge=1)] | None = None
    concurrency: Annotated[int, Field(ge=1)] | None = None

    @field_validator("rate")
    @classmethod
    def _rate(cls, value: str | None) -> str | None:
        return None if value is None else _checked(validate_rate, value)

    def plan(self, name: str) -> Plan:
        """The core :class:`~keyguard.Plan` these settings describe."""
        return Plan(name, self.rate, self.quota_daily, self.quota_monthly, self.concurrency)


DEFAULT_PLANS: Mapping[str, PlanSettings] = MappingProxyType(
    {
        name: PlanSettings(
            rate=plan.rate,
            quota_daily=plan.quota_daily,
            quota_monthly=plan.quota_monthly,
            concurrency=plan.concurrency,
        )
        for name, plan in CORE_PLANS.items()
    }
)
"""The built-in plans; configuration merges over them (see :class:`KeyGuardSettings`)."""


class _OwnDotEnv(PydanticBaseSettingsSource):
    """The ``.env`` source without the variables that belong to other tools.

    A project's ``.env`` usually holds more than keyguard's settings; only unknown
    ``KEYGUARD_*`` names are errors (they are typos), everything else is left alone.
    """

    def __init__(self, settings_cls: type[BaseSettings], inner: PydanticBaseSettingsSource) -> None:
        super().__init__(settings_cls)
        self._inner = inner

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ delegates to the real source

    def __call__(self) -> dict[str, Any]:
        fields = self.settings_cls.model_fields
        return {
            name: value
            for name, value in self._inner().items()
            if name in fields or name.lower().startswith("keyguard_")
        }


_CREDENTIAL_FIELDS = {
    "api_key_header": "header_name",
    "query_param": "query_param",
    "credential_methods": "methods",
}


class KeyGuardSettings(BaseSettings):
    """Everything a deployment configures, with the embedded defaults.

    :param storage_url: where keys live: ``sqlite:///keyguard.db`` (a file in the
        working directory), ``memory://``, ``redis://host:6379/0``, ...
    :param key_prefix: the first part of every key (``kg`` gives ``kg_live_...``).
    :param key_environments: the environments keys may name; the first is the default.
        From the environment, a JSON list or comma-separated names.
    :param pepper: a server-side secret of at least 16 bytes; when set, storage keeps
        HMAC-SHA256 digests. **Changing it makes every stored key unusable.**
    :param rotation_grace: how long a rotated key's old secret keeps working; a
        duration such as ``1h`` or ``30m``, or seconds.
    :param plans: named plans and their limits, merged over :data:`DEFAULT_PLANS`.
    :param default_plan: the plan new keys get when none is given; one of ``plans``.
    :param limiter_url: where limits are counted. By default: with ``redis://``
        storage in Redis; with ``sqlite://`` storage, windows and the concurrency cap
        in the memory of the one process that may use the file and quotas in the file;
        set it to the same ``sqlite:///`` URL in every worker to count all in the file.
    :param on_limiter_error: ``deny`` (503) or ``allow`` when the limit store fails.
    :param credential_methods: where keys may come from, in order: ``header``,
        ``bearer`` and (opt-in, since URLs get logged) ``query``.
    :param api_key_header: the header that carries a key.
    :param query_param: the query parameter that carries a key, when enabled.
    :param trusted_proxies: proxy networks whose ``X-Forwarded-For`` is believed.
    :param trusted_proxy_hops: or: how many proxies sit in front (count from the right).
    :param public_paths: paths served without a key (``/healthz``, ``/docs``, ``/static/*``).
    :param deny_ips: networks refused for every key.
    :param reveal_key_status: answer "expired"/"revoked" instead of the uniform "invalid".
    :param auth_failures: failed authentications per client IP per minute before 429.
    :param expiry_warning: add ``X-API-Key-Expires`` this long before a key expires.
    :param redis_prefix: the namespace (and Cluster hash tag) of keyguard's Redis keys.
    :param redis_timeout: seconds to wait for a Redis reply; a slower Redis counts as
        down and ``on_limiter_error`` applies.
    :param redis_connect_timeout: seconds to wait for a Redis connection.
    :param redis_max_connections: connections per pool (per node on a Cluster).
    :param key_cache_ttl: seconds a process may answer key lookups from its own cache
        (Redis; changes reach every process at once through pub/sub, and within this
        bound if pub/sub is lost).
    :param usage_enabled: record usage (per key, service and minute) and error logs.
    :param usage_url: where usage goes; by default :attr:`storage_url`.
    :param usage_flush_interval: seconds between usage writes (what a crash can lose).
    :param usage_error_log_size: error entries kept per key.
    :param usage_retention_minutes: how long per-minute rows are kept.
    :param usage_retention_hours: how long per-hour rows are kept.
    :param usage_retention_days: how long per-day rows are kept.
    :param alert_webhook_url: the operator's webhook for every alert (http or https).
    :param alert_webhook_secret: its HMAC-SHA256 signing secret (16 characters or more).
    :param alert_webhook_allow_private: let that URL be a private or loopback address.
    :param alert_quota_thresholds: shares of a daily or monthly quota that alert
        (``0.8,1.0``).
    :param alert_expiry_days: alert when a key expires within these many days (``7,1``).

    .. versionadded:: 0.1
    """

    model_config = SettingsConfigDict(
        env_prefix="KEYGUARD_",
        env_nested_delimiter="__",
        env_parse_none_str="null",
        extra="forbid",
        frozen=True,
        hide_input_in_errors=True,
    )

    storage_url: str = "sqlite:///keyguard.db"
    key_prefix: str = "kg"
    key_environments: Annotated[tuple[str, ...], NoDecode] = ("live", "test")
    pepper: SecretStr | None = None
    rotation_grace: timedelta = timedelta(hours=24)
    plans: dict[str, PlanSettings] = Field(default_factory=lambda: dict(DEFAULT_PLANS))
    default_plan: str = "free"
    config_file: Path | None = Field(default=None, description="the TOML file that was read")
    limiter_url: str | None = None
    on_limiter_error: Literal["deny", "allow"] = "deny"
    credential_methods: Annotated[tuple[CredentialMethod, ...], NoDecode] = ("header", "bearer")
    api_key_header: str = "x-api-key"
    query_param: str = "api_key"
    trusted_proxies: Annotated[tuple[str, ...], NoDecode] = ()
    trusted_proxy_hops: Annotated[int, Field(ge=0, le=32)] = 0
    public_paths: Annotated[tuple[str, ...], NoDecode] = ()
    deny_ips: Annotated[tuple[str, ...], NoDecode] = ()
    reveal_key_status: bool = False
    auth_failures: Annotated[int, Field(ge=0)] = 20
    expiry_warning: timedelta = timedelta(days=7)
    redis_prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")] = "keyguard"
    redis_timeout: Annotated[float, Field(gt=0, le=10)] = 0.1
    redis_connect_timeout: Annotated[float, Field(gt=0, le=10)] = 0.1
    redis_max_connections: Annotated[int, Field(ge=1, le=10_000)] = 64
    key_cache_ttl: Annotated[float, Field(ge=0, le=300)] = 5.0
    usage_enabled: bool = True
    usage_url: str | None = None
    usage_flush_interval: Annotated[float, Field(gt=0, le=60)] = 1.0
    usage_error_log_size: Annotated[int, Field(ge=1, le=10_000)] = 100
    usage_retention_minutes: timedelta = timedelta(days=2)
    usage_retention_hours: timedelta = timedelta(days=90)
    usage_retention_days: timedelta = timedelta(days=400)
    alert_webhook_url: str | None = None
    alert_webhook_secret: SecretStr | None = None
    alert_webhook_allow_private: bool = False
    alert_quota_thresholds: Annotated[tuple[float, ...], NoDecode] = (0.8, 1.0)
    alert_expiry_days: Annotated[tuple[float, ...], NoDecode] = (7.0, 1.0)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Add the TOML file below everything else, only when load_settings() names one."""
        dotenv = _OwnDotEnv(settings_cls, dotenv_settings)
        sources = (init_settings, env_settings, dotenv, file_secret_settings)
        toml_file = _TOML_FILE.get()
        if toml_file is None:
            return sources
        return (*sources, TomlConfigSettingsSource(settings_cls, toml_file=toml_file))

    @field_validator("storage_url", "limiter_url", "usage_url")
    @classmethod
    def _storage_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if len(value) > 4096 or not _URL.fullmatch(value):
            raise ValueError("must be a URL such as sqlite:///keyguard.db or memory://")
        return value

    @field_validator("api_key_header", "query_param", "credential_methods")
    @classmethod
    def _credentials(cls, value: object, info: ValidationInfo) -> object:
        try:
            options: dict[str, Any] = {_CREDENTIAL_FIELDS[info.field_name or ""]: value}
            CredentialConfig(**options)
        except ConfigurationError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("trusted_proxies", "deny_ips")
    @classmethod
    def _networks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        try:
            validate_cidrs(value)
        except InvalidInput as exc:
            raise ValueError(exc.reason) from None
        return value

    @field_validator("key_prefix")
    @classmethod
    def _key_prefix(cls, value: str) -> str:
        try:
            KeyFormat(prefix=value)
        except ConfigurationError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator(
        "key_environments",
        "credential_methods",
        "trusted_proxies",
        "public_paths",
        "deny_ips",
        "alert_quota_thresholds",
        "alert_expiry_days",
        mode="before",
    )
    @classmethod
    def _split_environments(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            return json.loads(text) if text.startswith("[") else text.split(",")
        return value

    @field_validator("key_environments")
    @classmethod
    def _key_environments(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        value = tuple(e.strip() for e in value)
        try:
            KeyFormat(environments=value)
        except ConfigurationError as exc:
            raise ValueError(str(exc)) from None
        if len(set(value)) != len(value):
            raise ValueError("key environments must not repeat")
        return value

    @field_validator("pepper")
    @classmethod
    def _pepper(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value().encode()) < _MIN_PEPPER_BYTES:
            raise ValueError(f"must be at least {_MIN_PEPPER_BYTES} bytes")
        return value

    @field_validator(
        "rotation_grace",
        "expiry_warning",
        "usage_retention_minutes",
        "usage_retention_hours",
        "usage_retention_days",
        mode="before",
    )
    @classmethod
    def _parse_grace(cls, value: object) -> object:
        if not isinstance(value, str):
            return value  # a timedelta, or seconds as a number
        text = value.strip()
        if text.isdigit():
            return int(text)
        if text.upper().startswith("P"):
            return text  # ISO-8601 (PT1H), which pydantic reads itself
        return _checked(lambda v: parse_duration("duration", v), text)

    @field_validator("rotation_grace", "expiry_warning")
    @classmethod
    def _grace_range(cls, value: timedelta) -> timedelta:
        if value < timedelta(0):
            raise ValueError("must not be negative")
        return value

    @field_validator("usage_retention_minutes", "usage_retention_hours", "usage_retention_days")
    @classmethod
    def _retention_range(cls, value: timedelta) -> timedelta:
        if not timedelta(hours=1) <= value <= timedelta(days=3650):
            raise ValueError("must be between 1h and 3650d")
        return value

    @field_validator("plans", mode="before")
    @classmethod
    def _merge_plans(cls, value: object) -> object:
        if not isinstance(value, Mapping):
            return value
        merged: dict[object, object] = {n: p.model_dump() for n, p in DEFAULT_PLANS.items()}
        for name, plan in value.items():
            base = merged.get(name)
            if isinstance(plan, Mapping) and isinstance(base, dict):
                merged[name] = {**base, **plan}
            else:
                merged[name] = plan
        return merged

    @field_validator("plans")
    @classmethod
    def _plan_names(cls, value: dict[str, PlanSettings]) -> dict[str, PlanSettings]:
        for name in value:
            _checked(validate_plan, name)
        return value

    @field_validator("default_plan")
    @classmethod
    def _default_plan_known(cls, value: str, info: ValidationInfo) -> str:
        plans = info.data.get("plans")
        if plans is not None and value not in plans:
            raise ValueError(f"{shown(value)} is not one of the plans: " + ", ".join(sorted(plans)))
        return value

    def key_format(self) -> KeyFormat:
        """The shape of this deployment's keys."""
        return KeyFormat(prefix=self.key_prefix, environments=self.key_environments)

    def hasher(self) -> KeyHasher:
        """The digest function, peppered when a pepper is configured."""
        return KeyHasher(None if self.pepper is None else self.pepper.get_secret_value())

    def plan_table(self) -> dict[str, Plan]:
        """Every configured plan as the :class:`~keyguard.Plan` the guard uses."""
        return {name: p.plan(name) for name, p in self.plans.items()}

    def open_store(self) -> KeyBackend:
        """A key store for :attr:`storage_url`; the caller closes it."""
        options = self.backend_options(self.storage_url)
        if options:
            options["cache_ttl"] = self.key_cache_ttl
        return open_key_store(self.storage_url, **options)

    def backend_options(self, url: str) -> dict[str, Any]:
        """The options these settings give a backend for ``url`` (Redis ones only)."""
        if not url.startswith(("redis://", "rediss://", "redis+")):
            return {}
        return {
            "prefix": self.redis_prefix,
            "socket_timeout": self.redis_timeout,
            "socket_connect_timeout": self.redis_connect_timeout,
            "pool_timeout": self.redis_connect_timeout,
            "max_connections": self.redis_max_connections,
        }

    def open_usage_store(self) -> UsageBackend:
        """A usage store for :attr:`usage_url` (else :attr:`storage_url`); the caller
        closes it."""
        url = self.usage_url or self.storage_url
        options = self.backend_options(url)
        if options:  # Redis expires rows itself, by the same retention the recorder prunes
            retention = self.usage_retention()
            options.update(
                minute_retention=retention.minute,
                hour_retention=retention.hour,
                day_retention=retention.day,
            )
        return open_usage_store(url, **options)

    def alert_config(self) -> AlertConfig:
        """The alert rules and the operator's webhook these settings describe.

        :raises ConfigurationError: a webhook URL without a secret (or the reverse), or
            values the alert rules refuse.
        """
        if (self.alert_webhook_url is None) != (self.alert_webhook_secret is None):
            raise ConfigurationError(
                "alert_webhook_url and alert_webhook_secret go together: set both or neither"
            )
        webhooks: tuple[Webhook, ...] = ()
        if self.alert_webhook_url is not None and self.alert_webhook_secret is not None:
            webhooks = (
                Webhook(
                    self.alert_webhook_url,
                    self.alert_webhook_secret.get_secret_value(),
                    allow_private=self.alert_webhook_allow_private,
                ),
            )
        rules = AlertRules(
            quota_thresholds=self.alert_quota_thresholds, expiry_days=self.alert_expiry_days
        )
        return AlertConfig(rules=rules, webhooks=webhooks)

    def usage_retention(self) -> Retention:
        """The retention of usage rows, per granularity."""
        return Retention(
            minute=int(self.usage_retention_minutes.total_seconds()),
            hour=int(self.usage_retention_hours.total_seconds()),
            day=int(self.usage_retention_days.total_seconds()),
        )

    def manager(
        self,
        store: KeyStore | None = None,
        clock: Clock | None = None,
        *,
        actor: str = "system",
    ) -> KeyManager:
        """A :class:`KeyManager` with these settings, on ``store`` or a newly opened one."""
        return KeyManager(
            self.open_store() if store is None else store,
            key_format=self.key_format(),
            hasher=self.hasher(),
            clock=clock,
            default_grace=self.rotation_grace,
            actor=actor,
        )


@contextmanager
def _reading_toml(path: Path | None) -> Iterator[None]:
    token = _TOML_FILE.set(path)
    try:
        yield
    finally:
        _TOML_FILE.reset(token)


def _config_file(toml_file: str | Path | None, env_file: str | Path | None) -> Path | None:
    """The TOML file to read: the argument, else ``KEYGUARD_CONFIG_FILE`` (environment,
    then ``.env``)."""
    if toml_file is None:
        toml_file = os.environ.get(CONFIG_FILE_VAR)
    if toml_file is None and env_file is not None and Path(env_file).is_file():
        toml_file = dotenv_values(env_file).get(CONFIG_FILE_VAR)
    if toml_file is None or toml_file == "":
        return None
    path = Path(toml_file)
    if not path.is_file():
        raise ConfigurationError(f"config file {shown(str(path))} does not exist")
    return path


def load_settings(
    *,
    env_file: str | Path | None = ".env",
    toml_file: str | Path | None = None,
    **overrides: Any,
) -> KeyGuardSettings:
    """Settings from every source, in increasing precedence: defaults, the TOML file,
    ``.env``, the environment, then ``overrides``.

    :param env_file: a dotenv file; a missing one is skipped. ``None`` reads none.
    :param toml_file: a TOML file (top-level keys are field names, ``[plans.free]``
        tables for plans); when ``None``, the ``KEYGUARD_CONFIG_FILE`` variable names
        it. A named file that does not exist is a :class:`ConfigurationError`.
    :param overrides: field values that win over every source, e.g. from CLI options.

    Raises :class:`pydantic.ValidationError` for a bad value (see
    :func:`describe_settings_error`) and :class:`ConfigurationError` for an unreadable
    file.

    .. versionadded:: 0.1
    """
    path = _config_file(toml_file, env_file)
    if path is not None:
        overrides.setdefault("config_file", path)
    # pydantic-settings takes the dotenv path as a private init argument.
    arguments: dict[str, Any] = {"_env_file": env_file, **overrides}
    try:
        with _reading_toml(path):
            return KeyGuardSettings(**arguments)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(
            f"config file {shown(str(path))} is not valid TOML: {exc}"
        ) from None
    except SettingsError as exc:
        # Raised for a variable that is not valid JSON; its message names the field only.
        raise ConfigurationError(str(exc)) from None


def describe_settings_error(exc: ValidationError) -> str:
    """One line naming the first bad setting and why, e.g.
    ``invalid setting plans.free.rate: ...``.

    pydantic's rendering of the input is left out (it may be the pepper); only
    keyguard's own messages quote a value, and never a secret one.
    """
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    if not errors:
        return "invalid settings"
    first = errors[0]
    where = ".".join(str(part) for part in first["loc"]) or "settings"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    if first["type"] == "extra_forbidden":
        line = f"unknown setting {where}{more}"
    else:
        message = first["msg"].removeprefix("Value error, ")
        line = f"invalid setting {where}: {message}{more}"
    return " ".join(line.split())
