"""Build a ready :class:`Guard` from :class:`KeyGuardSettings`: one place that turns
configuration into objects, so the server, the CLI and users' apps agree."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from urllib.parse import urlsplit

from .backends.protocols import KeyBackend
from .backends.registry import open_rate_store
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

__all__ = ["build_guard", "limiter_url_for"]


def limiter_url_for(settings: KeyGuardSettings) -> str:
    """Where limits are counted: ``limiter_url``, else beside the keys.

    A SQLite key store shares its file with the limiter, so limits stay exact across
    the worker processes of one machine; anything else counts in memory.
    """
    if settings.limiter_url is not None:
        return settings.limiter_url
    scheme = urlsplit(settings.storage_url).scheme
    shared = {"sqlite", "redis", "rediss", "redis+sentinel", "redis+cluster"}
    return settings.storage_url if scheme in shared else "memory://"


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
    """
    proxies = TrustedProxies(hops=settings.trusted_proxy_hops, networks=settings.trusted_proxies)
    public_paths = (*public, *settings.public_paths)
    routes = RouteMap(rules, public=public_paths) if rules or public_paths else None
    if limiter is None:
        url = limiter_url_for(settings)
        limiter_options = settings.backend_options(url)
        if clock is not None:
            limiter_options["clock"] = clock
        limiter = open_rate_store(url, **limiter_options)
        _warn_if_per_worker(url)
        _warn_if_evicting(limiter)
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


def _warn_if_per_worker(url: str) -> None:
    """Say so at start-up when in-memory limits will be multiplied by worker processes.

    ``WEB_CONCURRENCY`` is the worker count uvicorn, gunicorn and most platforms set.
    """
    workers = os.environ.get("WEB_CONCURRENCY", "1").strip()
    if urlsplit(url).scheme == "memory" and workers.isdigit() and int(workers) > 1:
        logging.getLogger("keyguard").warning(
            "keyguard counts limits in memory, per worker process: with %s workers a key "
            "gets up to %s times its limits; use sqlite:// or redis:// to share them",
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
