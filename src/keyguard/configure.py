"""Build a ready :class:`Guard` from :class:`KeyGuardSettings`: one place that turns
configuration into objects, so the server, the CLI and users' apps agree."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from urllib.parse import urlsplit

from .backends._process_lock import hold_limits_lock
from .backends._sqlite import file_path
from .backends.local_limiter import LocalWindowsRateStore
from .backends.memory_limiter import MemoryRateStore
from .backends.protocols import KeyBackend
from .backends.registry import open_rate_store
from .backends.sqlite_limiter import SQLiteRateStore
from .clock import Clock
from .credentials import CredentialConfig
from .guard import Guard
from .limiting import RateBackend
from .oauth.claims import TokenValidator
from .plans import ServiceLimits
from .proxies import TrustedProxies
from .scopes import RouteMap, RouteRule
from .settings import KeyGuardSettings
from .usage.recorder import UsageRecorder

__all__ = ["build_guard", "limiter_url_for", "open_limiter", "quota_url_for"]

_REDIS = frozenset({"redis", "rediss", "redis+sentinel", "redis+cluster"})
_IN_MEMORY = (":memory:", "/:memory:")  # as SQLiteKeyStore.from_url reads them


def _sqlite_file(url: str) -> str | None:
    """The database file a ``sqlite://`` URL names; ``None`` for another scheme or an
    in-memory database (``sqlite://:memory:``), which no other process can open."""
    if urlsplit(url).scheme != "sqlite" or url.removeprefix("sqlite://") in _IN_MEMORY:
        return None
    return file_path(url)


def limiter_url_for(settings: KeyGuardSettings) -> str:
    """Where windows and the concurrency cap are counted: ``limiter_url``, else
    beside Redis keys, else in this process (``memory://``).

    Under a SQLite storage URL they are counted in the memory of the one server
    process (see :func:`build_guard`), and quotas in the file (:func:`quota_url_for`).
    """
    if settings.limiter_url is not None:
        return settings.limiter_url
    scheme = urlsplit(settings.storage_url).scheme
    return settings.storage_url if scheme in _REDIS else "memory://"


def quota_url_for(settings: KeyGuardSettings) -> str:
    """Where daily and monthly quotas are counted: the SQLite key file when no
    ``limiter_url`` is set (so a restart keeps a month's count), else where
    :func:`limiter_url_for` counts everything."""
    if settings.limiter_url is None and _sqlite_file(settings.storage_url) is not None:
        return settings.storage_url
    return limiter_url_for(settings)


def build_guard(
    settings: KeyGuardSettings,
    *,
    keys: KeyBackend | None = None,
    limiter: RateBackend | None = None,
    rules: tuple[RouteRule, ...] = (),
    public: tuple[str, ...] = (),
    clock: Clock | None = None,
    tokens: TokenValidator | None = None,
    usage: UsageRecorder | None = None,
    services: Mapping[str, ServiceLimits] | None = None,
) -> Guard:
    """A guard configured by ``settings``; stores are opened unless given.

    ``rules`` map routes to the scopes they need; ``public`` and
    ``settings.public_paths`` are served without a key; ``tokens`` validates OAuth
    access tokens in the bearer slot; ``services`` gives each service (scope) its cost
    in units and windows of its own. The caller owns the stores and closes them,
    except the usage store opened here, which the recorder closes with itself
    (``guard.usage.close()``; the ASGI middleware does it on lifespan shutdown).

    The limiter, unless given, is :func:`open_limiter`'s: under a SQLite storage URL
    with no ``limiter_url`` it counts windows in this process's memory, which only one
    process per file may do (a second raises :class:`ConfigurationError`).
    """
    proxies = TrustedProxies(hops=settings.trusted_proxy_hops, networks=settings.trusted_proxies)
    public_paths = (*public, *settings.public_paths)
    routes = RouteMap(rules, public=public_paths) if rules or public_paths else None
    if limiter is None:
        limiter = open_limiter(settings, clock=clock)
    if usage is None and settings.usage_enabled:
        usage = UsageRecorder(
            settings.open_usage_store(),
            clock=clock,
            flush_interval=settings.usage_flush_interval,
            error_log_size=settings.usage_error_log_size,
            retention=settings.usage_retention(),
            owns_store=True,
        )
    return Guard(
        keys=keys if keys is not None else settings.open_store(),
        limiter=limiter,
        credentials=CredentialConfig(
            methods=settings.credential_methods,
            header_name=settings.api_key_header,
            query_param=settings.query_param,
        ),
        proxies=proxies,
        routes=routes,
        plans=settings.plan_table(),
        key_format=settings.key_format(),
        hasher=settings.hasher(),
        clock=clock,
        on_limiter_error=settings.on_limiter_error,
        reveal_key_status=settings.reveal_key_status,
        expiry_warning=settings.expiry_warning,
        auth_failures=settings.auth_failures,
        deny_ips=settings.deny_ips,
        tokens=tokens,
        default_plan=settings.default_plan,
        usage=usage,
        services=services,
    )


def open_limiter(settings: KeyGuardSettings, *, clock: Clock | None = None) -> RateBackend:
    """The rate store ``settings`` describe, holding the process's lock on a SQLite file.

    Under a SQLite storage URL and no ``limiter_url``: windows and the cap in memory,
    quotas in the file (:class:`LocalWindowsRateStore`), with the file's exclusive
    limits lock. With ``limiter_url`` naming a SQLite file: everything in the file, with
    a shared lock, so any number of such processes may run (and none of the former).

    :raises ConfigurationError: another process's lock conflicts (the message says
        how to run several workers), or a store cannot be opened.
    """
    url, quota_url = limiter_url_for(settings), quota_url_for(settings)
    options = settings.backend_options(url)
    if clock is not None:
        options["clock"] = clock
    db = _sqlite_file(quota_url)
    if db is None or quota_url == url:  # one store; shared lock when it is a file
        limiter = open_rate_store(url, **options)
        _held(limiter, db, exclusive=False)
        _warn_if_per_worker(url)
        _warn_if_evicting(limiter)
        return limiter
    local = LocalWindowsRateStore(MemoryRateStore(clock=clock), SQLiteRateStore(db, clock=clock))
    _held(local, db, exclusive=True)
    _warn_if_workers_share(db)
    return local


def _held(limiter: RateBackend, db: str | None, *, exclusive: bool) -> None:
    """Take the lock of ``db`` (if any) for ``limiter``; close it when refused."""
    if db is None:
        return
    try:
        hold_limits_lock(db, exclusive=exclusive)
    except BaseException:
        limiter.close()
        raise


def _workers() -> int:
    """``WEB_CONCURRENCY``: the worker count uvicorn, gunicorn and most platforms set."""
    workers = os.environ.get("WEB_CONCURRENCY", "1").strip()
    return int(workers) if workers.isdigit() else 1


def _warn_if_workers_share(db: str) -> None:
    """Say at start-up why the other workers will fail, before they do."""
    workers = _workers()
    if workers > 1:
        logging.getLogger("keyguard").warning(
            "WEB_CONCURRENCY is %s, but only one process may count the limits of %r in "
            "memory: the others will refuse to start; set KEYGUARD_LIMITER_URL to the "
            "same sqlite:/// URL in every process to count them in the file",
            workers,
            db,
        )


def _warn_if_per_worker(url: str) -> None:
    """Say so at start-up when in-memory limits will be multiplied by worker processes."""
    workers = _workers()
    if urlsplit(url).scheme == "memory" and workers > 1:
        logging.getLogger("keyguard").warning(
            "keyguard counts limits in memory, per worker process: with %s workers a key "
            "gets up to %s times its limits; set KEYGUARD_LIMITER_URL to a sqlite:/// or redis:// "
            "URL to share them",
            workers,
            workers,
        )


def _warn_if_evicting(limiter: RateBackend) -> None:
    """Say so at start-up when Redis may evict live counters (an ``allkeys-*`` policy)."""
    read = getattr(limiter, "eviction_policy", None)
    policy = read() if callable(read) else None
    if isinstance(policy, str) and policy.startswith("allkeys-"):
        logging.getLogger("keyguard").warning(
            "Redis maxmemory-policy is %s: it may evict live rate-limit counters and so "
            "reset limits; use noeviction or volatile-ttl (keyguard sets a TTL on every key)",
            policy,
        )
