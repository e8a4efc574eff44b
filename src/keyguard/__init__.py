"""keyguard: API keys, scopes, limits and usage for existing ASGI and WSGI apps."""

from .backends import open_key_store
from .errors import (
    ConfigurationError,
    InvalidCredential,
    InvalidInput,
    KeyGuardError,
    KeyNotFound,
    StorageError,
)
from .keys import KeyFormat, KeyHasher, Secret
from .lifecycle import UNSET, KeyChanges
from .manager import AsyncKeyManager, IssuedKey, KeyManager
from .records import AuditEvent, KeyPage, KeyRecord, KeyStatus, LimitOverrides

__version__ = "0.1.0"

__all__ = [
    "UNSET",
    "AsyncKeyManager",
    "AuditEvent",
    "ConfigurationError",
    "InvalidCredential",
    "InvalidInput",
    "IssuedKey",
    "KeyChanges",
    "KeyFormat",
    "KeyGuardError",
    "KeyHasher",
    "KeyManager",
    "KeyNotFound",
    "KeyPage",
    "KeyRecord",
    "KeyStatus",
    "LimitOverrides",
    "Secret",
    "StorageError",
    "__version__",
    "open_key_store",
]
