"""What a validated access token is, and how a validator talks to the guard.

This module imports no JOSE library, so :mod:`keyguard.guard` can depend on it while
PyJWT stays an optional extra. A validator is anything with the
:class:`TokenValidator` shape: a flow (see :mod:`keyguard.flows`) that yields the
rare I/O it needs (a JWKS fetch, an introspection call) as operations, so the guard's
sync and async drivers run it unchanged, and the async one never blocks the loop.

.. versionadded:: 0.2
"""

from __future__ import annotations

import re
from collections.abc import Generator, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias, runtime_checkable

from ..errors import InvalidCredential, KeyGuardError
from ..flows import Op

__all__ = [
    "MAX_SCOPES",
    "InvalidToken",
    "TokenClaims",
    "TokenFlow",
    "TokenUnavailable",
    "TokenValidator",
    "parse_scope",
    "scope_covers",
    "scope_list",
    "valid_client_id",
]

TokenFlow: TypeAlias = Generator[Op[Any, Any, Any], Any, "TokenClaims"]
MAX_SCOPES = 100
_MAX_SCOPE_TEXT = 4096
# A client id names a limiter bucket and an identity: printable ASCII without spaces,
# quotes, braces (Redis hash tags) or backslashes, and short.
_CLIENT_ID = re.compile(r"[A-Za-z0-9._~:@/+=|!$&'()*,;?#\[\]-]{1,200}")


@dataclass(frozen=True, slots=True)
class TokenClaims:
    """The caller an access token proved, as the guard uses it.

    :param client_id: the OAuth client; limits, quotas and usage are counted for it.
    :param scopes: the granted scopes (split from the configured claim).
    :param issuer: the token's ``iss`` (or the introspection endpoint's answer).
    :param expires_at: ``exp`` as a timestamp.
    :param subject: ``sub``, when the token names one.
    :param token_id: ``jti``, when the token carries one (never the token itself).
    :param key_id: set only by a validator for keyguard's own tokens: the keyguard key
        the token was issued for, whose record, limits and status then apply.
    """

    client_id: str
    scopes: tuple[str, ...]
    issuer: str
    expires_at: float
    subject: str | None = None
    token_id: str | None = None
    key_id: str | None = None


class InvalidToken(InvalidCredential):
    """A bearer token was refused: answer ``401 invalid_token``, whatever the reason.

    ``reason`` is a fixed word for logs and metrics, never token data. ``forged`` says
    the token failed before its signature was proven (malformed, unknown key, bad
    signature): such failures count towards the per-address brute-force limiter,
    while an expired but genuine token does not, as for keys.
    """

    def __init__(self, reason: str, *, forged: bool = True) -> None:
        super().__init__(reason)
        self.forged = forged


class TokenUnavailable(KeyGuardError):
    """Tokens cannot be checked now (no key set ever loaded, introspection down):
    answer 503 with ``Retry-After``, never 401, which would make clients drop good
    tokens (SECURITY.md summary item 3)."""

    def __init__(self, retry_after: float) -> None:
        super().__init__("token validation is temporarily unavailable")
        self.retry_after = retry_after


@runtime_checkable
class TokenValidator(Protocol):
    """What :class:`~keyguard.guard.Guard` needs from its ``tokens`` option.

    ``flow(token, now)`` returns :class:`TokenClaims` or raises :class:`InvalidToken`
    or :class:`TokenUnavailable`; the operations it yields must raise nothing but
    :class:`~keyguard.errors.StorageError`. ``in_process`` is ``True`` when the flow
    never yields (static keys), so the guard may run it inline on an event loop.
    ``max_token_bytes`` is the longest token the validator reads.
    """

    @property
    def in_process(self) -> bool: ...

    @property
    def max_token_bytes(self) -> int: ...

    def flow(self, token: str, now: float) -> TokenFlow: ...


def parse_scope(value: object, *, wildcards: bool) -> tuple[str, ...]:
    """The scopes of a space-delimited ``scope`` string (RFC 9068 §2.2.3, RFC 8693).

    Split on single spaces and matched exactly later: ``readwrite`` is not ``read``.
    Scopes holding ``*`` are dropped unless ``wildcards`` (keyguard's own tokens):
    another issuer's ``*`` is a literal, not keyguard's grant-everything.

    :raises InvalidToken: not a string, too long, or too many scopes.
    """
    if not isinstance(value, str) or len(value) > _MAX_SCOPE_TEXT:
        raise InvalidToken("scope", forged=False)
    return scope_list(value.split(" "), wildcards=wildcards)


def scope_list(values: Iterable[object], *, wildcards: bool) -> tuple[str, ...]:
    """Scopes from a list claim (``scp``, ``permissions``), under the same rules."""
    scopes: list[str] = []
    for item in values:
        if not isinstance(item, str) or len(item) > 200 or not item.isprintable():
            raise InvalidToken("scope", forged=False)
        if item and " " not in item and (wildcards or "*" not in item) and item not in scopes:
            scopes.append(item)
    if len(scopes) > MAX_SCOPES:
        raise InvalidToken("scope", forged=False)
    return tuple(scopes)


def scope_covers(granted: Iterable[str], requested: str) -> bool:
    """Whether ``granted`` may hand ``requested`` on (to a token, or a token's caller).

    Concrete scopes follow :func:`keyguard.scopes.scope_allows`; a wildcard is covered
    only by itself, by ``*`` or by a broader wildcard (``image:*`` covers
    ``image:hd:*``), so a token never gets more than its key.
    """
    granted = tuple(granted)
    if requested in granted or "*" in granted:
        return True
    if "*" in requested:
        if not requested.endswith(":*") or "*" in requested[:-2]:
            return False
        return any(g.endswith(":*") and requested.startswith(g[:-1]) for g in granted)
    return any(
        g.endswith(":*") and len(requested) >= len(g) and requested.startswith(g[:-1])
        for g in granted
    )


def valid_client_id(value: object) -> str | None:
    """``value`` if it can name a client (a bucket and an identity), else ``None``."""
    if isinstance(value, str) and _CLIENT_ID.fullmatch(value):
        return value
    return None
