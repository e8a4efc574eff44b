"""keyguard: API keys, scopes, limits and usage for existing ASGI and WSGI apps."""

from .backends import open_key_store, open_rate_store
from .configure import build_guard
from .errors import (
    ConfigurationError,
    InvalidCredential,
    InvalidInput,
    KeyGuardError,
    KeyNotFound,
    StorageError,
)
from .guard import Allow, Guard, Identity
from .keys import KeyFormat, KeyHasher, Secret
from .lifecycle import UNSET, KeyChanges
from .manager import AsyncKeyManager, IssuedKey, KeyManager
from .plans import Plan, ServiceLimits
from .records import AuditEvent, KeyPage, KeyRecord, KeyStatus, LimitOverrides
from .settings import KeyGuardSettings, load_settings

__version__ = "0.1.0"

__all__ = [
    "UNSET",
    "Allow",
    "AsyncKeyManager",
    "AuditEvent",
    "ConfigurationError",
    "Guard",
    "Identity",
    "InvalidCredential",
    "InvalidInput",
    "IssuedKey",
    "KeyChanges",
    "KeyFormat",
    "KeyGuardError",
    "KeyGuardSettings",
    "KeyHasher",
    "KeyManager",
    "KeyNotFound",
    "KeyPage",
    "KeyRecord",
    "KeyStatus",
    "LimitOverrides",
    "Plan",
    "Secret",
    "ServiceLimits",
    "StorageError",
    "__version__",
    "build_guard",
    "load_settings",
    "open_key_store",
    "open_rate_store",
]
