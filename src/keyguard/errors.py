"""keyguard's exceptions.

The hierarchy is small so callers can catch at the level they care about::

    KeyGuardError
    ├── ConfigurationError      bad settings, unknown storage URL, missing driver
    ├── InvalidInput            a value given to an admin operation or the CLI is refused
    ├── KeyNotFound             an admin operation named a key id that does not exist
    ├── StorageError            a backend failed (driver errors are chained, never shown)
    └── InvalidCredential       a presented key is malformed, unknown, expired or revoked

No message ever contains a secret: the raw key never reaches an exception, and values
echoed back in ``InvalidInput`` are truncated and stripped of control characters.
"""

from __future__ import annotations

__all__ = [
    "ConfigurationError",
    "InvalidCredential",
    "InvalidInput",
    "KeyGuardError",
    "KeyNotFound",
    "StorageError",
    "shown",
]

_SHOWN_MAX = 40


def shown(value: object) -> str:
    """Render a user-supplied value for an error message: short and printable."""
    text = value if isinstance(value, str) else repr(value)
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    if len(text) > _SHOWN_MAX:
        text = text[: _SHOWN_MAX - 1] + "…"
    return repr(text)


class KeyGuardError(Exception):
    """Base class of every error keyguard raises on purpose."""


class ConfigurationError(KeyGuardError):
    """The deployment is configured wrongly; raised at start-up, never per request."""


class InvalidInput(KeyGuardError, ValueError):
    """A value handed to keyguard was refused; nothing was changed.

    ``field`` names the offending input so a CLI or an admin API can point at it.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message


class KeyNotFound(KeyGuardError, LookupError):
    """No key has the given public id."""

    def __init__(self, key_id: str) -> None:
        super().__init__(f"no key with id {shown(key_id)}")
        self.key_id = key_id


class StorageError(KeyGuardError):
    """A backend could not do its work; the driver's exception is the ``__cause__``."""


class InvalidCredential(KeyGuardError):
    """A presented key is not valid.

    ``reason`` is for logs and metrics only (``malformed``, ``unknown``, ``expired``,
    ``revoked``); callers must answer every reason the same way so that a response
    does not tell an attacker which one applied.
    """

    def __init__(self, reason: str) -> None:
        super().__init__("invalid or expired credential")
        self.reason = reason
