"""Backends chosen by URL, through an explicit registry.

``open_key_store("sqlite:///keyguard.db")`` looks the scheme up in a plain dict
filled by :func:`register_key_store`; drivers are imported only when their scheme is
used, so the core needs none of them installed.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from ..errors import ConfigurationError, shown
from .protocols import KeyBackend

__all__ = ["open_key_store", "register_key_store", "registered_schemes"]

Factory = Callable[..., Any]
_KEY_STORES: dict[str, Factory] = {}


def register_key_store(scheme: str, factory: Factory) -> None:
    """Make ``scheme://`` URLs open with ``factory(url, **options)``."""
    _KEY_STORES[scheme] = factory


def registered_schemes() -> tuple[str, ...]:
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


def open_key_store(url: str, **options: Any) -> KeyBackend:
    """A key store for ``url``: ``memory://``, ``sqlite:///path/keyguard.db``, ...

    Raises :class:`ConfigurationError` for a malformed URL or an unknown scheme, naming
    the schemes that are known.
    """
    if not isinstance(url, str) or "://" not in url or len(url) > 4096:
        raise ConfigurationError(
            f"storage URL {shown(url)} is not a URL; use one of "
            + ", ".join(f"{s}://" for s in registered_schemes())
        )
    scheme = urlsplit(url).scheme
    factory = _KEY_STORES.get(scheme)
    if factory is None:
        raise ConfigurationError(
            f"unknown storage scheme {shown(scheme)}; known: "
            + ", ".join(f"{s}://" for s in registered_schemes())
        )
    store = factory(url, **options)
    if not isinstance(store, KeyBackend):
        raise ConfigurationError(f"the {scheme}:// factory did not return a key store")
    return store
