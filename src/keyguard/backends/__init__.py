"""Storage backends, chosen by URL (``memory://``, ``sqlite:///path``, ``redis://``)."""

from .protocols import AsyncKeyStore, KeyBackend, KeyStore
from .registry import (
    open_key_store,
    open_rate_store,
    register_key_store,
    register_rate_store,
    registered_schemes,
)

__all__ = [
    "AsyncKeyStore",
    "KeyBackend",
    "KeyStore",
    "open_key_store",
    "open_rate_store",
    "register_key_store",
    "register_rate_store",
    "registered_schemes",
]
