"""Backends chosen by URL, through an explicit registry.

``open_key_store("sqlite:///keyguard.db")``, ``open_rate_store("memory://")`` and
``open_usage_store("redis://...")`` look the scheme up in plain dicts filled by
:func:`register_key_store`, :func:`register_rate_store` and
:func:`register_usage_store`; drivers are imported only when their scheme is used, so
the core needs none of them installed. A rate-store URL whose scheme keyguard does
not know is handed to the ``limits`` library (memcached, MongoDB, ...).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from ..errors import ConfigurationError, shown
from ..limiting import RateBackend
from ..usage.store import UsageBackend
from .protocols import KeyBackend

__all__ = [
    "open_key_store",
    "open_rate_store",
    "open_usage_store",
    "register_key_store",
    "register_rate_store",
    "register_usage_store",
    "registered_schemes",
]

Factory = Callable[..., Any]
_KEY_STORES: dict[str, Factory] = {}
_RATE_STORES: dict[str, Factory] = {}
_USAGE_STORES: dict[str, Factory] = {}


def register_key_store(scheme: str, factory: Factory) -> None:
    """Make ``scheme://`` key-store URLs open with ``factory(url, **options)``."""
    _KEY_STORES[scheme] = factory


def register_rate_store(scheme: str, factory: Factory) -> None:
    """Make ``scheme://`` rate-store URLs open with ``factory(url, **options)``."""
    _RATE_STORES[scheme] = factory


def register_usage_store(scheme: str, factory: Factory) -> None:
    """Make ``scheme://`` usage-store URLs open with ``factory(url, **options)``."""
    _USAGE_STORES[scheme] = factory


def registered_schemes() -> tuple[str, ...]:
    """The key-store schemes known now."""
    return tuple(sorted(_KEY_STORES))


def _lazy(module: str, name: str, extra: str | None = None, driver: str | None = None) -> Factory:
    def factory(url: str, **options: Any) -> Any:  # noqa: ANN401 - each backend has its own type
        try:
            target = getattr(importlib.import_module(module, __package__), name)
        except ModuleNotFoundError as exc:
            if driver is None or exc.name is None or not exc.name.startswith(driver):
                raise
            raise ConfigurationError(
                f"this storage URL needs {driver!r}; install keyguard[{extra}]"
            ) from None
        return target.from_url(url, **options)

    return factory


register_key_store("memory", _lazy(".memory", "MemoryKeyStore"))
register_key_store("sqlite", _lazy(".sqlite", "SQLiteKeyStore"))
register_key_store("redis", _lazy(".redis", "RedisKeyStore", "redis", "redis"))
register_key_store("rediss", _lazy(".redis", "RedisKeyStore", "redis", "redis"))
register_key_store("redis+sentinel", _lazy(".redis", "RedisKeyStore", "redis", "redis"))
register_key_store("redis+cluster", _lazy(".redis", "RedisKeyStore", "redis", "redis"))
register_rate_store("memory", _lazy(".memory_limiter", "MemoryRateStore"))
register_rate_store("sqlite", _lazy(".sqlite_limiter", "SQLiteRateStore"))
register_rate_store("redis", _lazy(".redis_limiter", "RedisRateStore", "redis", "redis"))
register_rate_store("rediss", _lazy(".redis_limiter", "RedisRateStore", "redis", "redis"))
register_rate_store("redis+sentinel", _lazy(".redis_limiter", "RedisRateStore", "redis", "redis"))
register_rate_store("redis+cluster", _lazy(".redis_limiter", "RedisRateStore", "redis", "redis"))
register_usage_store("memory", _lazy(".memory_usage", "MemoryUsageStore"))
register_usage_store("sqlite", _lazy(".sqlite_usage", "SQLiteUsageStore"))
register_usage_store("redis", _lazy(".redis_usage", "RedisUsageStore", "redis", "redis"))
register_usage_store("rediss", _lazy(".redis_usage", "RedisUsageStore", "redis", "redis"))
register_usage_store("redis+sentinel", _lazy(".redis_usage", "RedisUsageStore", "redis", "redis"))
register_usage_store("redis+cluster", _lazy(".redis_usage", "RedisUsageStore", "redis", "redis"))
_LIMITS_FALLBACK = _lazy(".limits_storage", "LimitsRateStore")


def _scheme(url: object, kind: str, known: dict[str, Factory]) -> str:
    if not isinstance(url, str) or "://" not in url or len(url) > 4096:
        raise ConfigurationError(
            f"{kind} URL {shown(url)} is not a URL; use one of "
            + ", ".join(f"{s}://" for s in sorted(known))
        )
    return urlsplit(url).scheme


def _known(url: object, kind: str, known: dict[str, Factory]) -> tuple[str, Factory]:
    """The scheme of ``url`` and its factory; an unknown scheme names the known ones."""
    scheme = _scheme(url, kind, known)
    factory = known.get(scheme)
    if factory is None:
        raise ConfigurationError(
            f"unknown {kind} scheme {shown(scheme)}; known: "
            + ", ".join(f"{s}://" for s in sorted(known))
        )
    return scheme, factory


def open_key_store(url: str, **options: Any) -> KeyBackend:
    """A key store for ``url``: ``memory://``, ``sqlite:///path/keyguard.db``, ...

    Raises :class:`ConfigurationError` for a malformed URL or an unknown scheme, naming
    the schemes that are known.
    """
    scheme, factory = _known(url, "storage", _KEY_STORES)
    store = factory(url, **options)
    if not isinstance(store, KeyBackend):
        raise ConfigurationError(f"the {scheme}:// factory did not return a key store")
    return store


def open_rate_store(url: str, **options: Any) -> RateBackend:
    """A rate store for ``url``: ``memory://``, ``sqlite:///path.db``, or a ``limits`` URL.

    **Note**: stores opened through ``limits`` (memcached, MongoDB, ...) check each
    window separately, so they are not atomic across windows.
    """
    scheme = _scheme(url, "limiter", _RATE_STORES)
    store = _RATE_STORES.get(scheme, _LIMITS_FALLBACK)(url, **options)
    if not isinstance(store, RateBackend):
        raise ConfigurationError(f"the {scheme}:// factory did not return a rate store")
    return store


def open_usage_store(url: str, **options: Any) -> UsageBackend:
    """A usage store for ``url``: ``memory://``, ``sqlite:///path.db``, ``redis://...``.

    Raises :class:`ConfigurationError` for a malformed URL or an unknown scheme, naming
    the schemes that are known.
    """
    scheme, factory = _known(url, "usage storage", _USAGE_STORES)
    store = factory(url, **options)
    if not isinstance(store, UsageBackend):
        raise ConfigurationError(f"the {scheme}:// factory did not return a usage store")
    return store
