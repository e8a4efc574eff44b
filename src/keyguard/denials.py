"""The one table of denials: every reason keyguard refuses a request, in one place.

Each code maps to an HTTP status, an error type, a fixed message and the headers
its status calls for. Adapters never build a refusal themselves; they render a
:class:`Denial` with :func:`render`, so every framework answers byte for byte alike.
Messages are fixed strings: nothing from the request is ever echoed.
"""

from __future__ import annotations

import json
import math
import re
import secrets
from dataclasses import dataclass, field
from typing import Final

from .errors import ConfigurationError

__all__ = ["TABLE", "Denial", "Entry", "deny", "render"]

Headers = list[tuple[bytes, bytes]]


@dataclass(frozen=True, slots=True)
class Entry:
    status: int
    type: str
    message: str
    challenge: str | None = None  # RFC 6750 error code for WWW-Authenticate, "" for none


TABLE: Final[dict[str, Entry]] = {
    "missing_api_key": Entry(
        401, "authentication_error", "An API key is required for this request.", ""
    ),
    "invalid_api_key": Entry(
        401,
        "authentication_error",
        "The API key is invalid, expired or revoked.",
        "invalid_token",
    ),
    "api_key_expired": Entry(
        401, "authentication_error", "The API key has expired.", "invalid_token"
    ),
    "api_key_revoked": Entry(
        401, "authentication_error", "The API key has been revoked.", "invalid_token"
    ),
    # An OAuth access token (keyguard.oauth) that is malformed, forged, expired, for
    # another audience or issuer, or whose key was revoked: one answer for all.
    "invalid_token": Entry(
        401,
        "authentication_error",
        "The access token is invalid or expired.",
        "invalid_token",
    ),
    "invalid_request": Entry(
        400,
        "invalid_request_error",
        "The request carries a malformed credential or more than one.",
        "invalid_request",
    ),
    "insufficient_permissions": Entry(
        403,
        "permission_error",
        "The API key lacks the scope this request needs.",
        "insufficient_scope",
    ),
    "plan_not_available": Entry(
        403, "permission_error", "The API key's plan is not available on this service."
    ),
    "ip_not_allowed": Entry(
        403, "permission_error", "Requests from this address are not allowed for this key."
    ),
    "rate_limit_exceeded": Entry(429, "rate_limit_error", "Rate limit exceeded."),
    "quota_exceeded": Entry(429, "rate_limit_error", "Quota exceeded."),
    "concurrency_limit_exceeded": Entry(
        429, "rate_limit_error", "Too many requests in flight for this key."
    ),
    "too_many_failed_attempts": Entry(
        429, "rate_limit_error", "Too many failed authentication attempts from this address."
    ),
    "limiter_unavailable": Entry(
        503, "service_unavailable", "Rate limiting is temporarily unavailable."
    ),
    "key_store_unavailable": Entry(
        503, "service_unavailable", "Authentication is temporarily unavailable."
    ),
    # No token signing keys could ever be loaded (or introspection is down): 503, not
    # 401, so clients keep their good tokens (SECURITY.md summary item 3, T36, T47).
    "token_validation_unavailable": Entry(
        503, "service_unavailable", "Token validation is temporarily unavailable."
    ),
    # A bug or an unexpected failure inside keyguard (SECURITY.md a.10): a generic body,
    # nothing internal, and never the exception's message, which may hold request data.
    "internal_error": Entry(500, "api_error", "An internal error occurred."),
}

_SAFE_DETAIL = re.compile(r"[\x20\x21\x23-\x5b\x5d-\x7e]*")  # RFC 6750 error_description


@dataclass(frozen=True, slots=True)
class Denial:
    """A refusal: a code from :data:`TABLE` plus the details that vary.

    ``detail`` is a fixed, safe phrase appended to the message (a scope name, a
    window name), ``retry_after`` seconds (rounded up, at least 1), and ``headers``
    any extra headers such as the limit state. ``key_id``, ``owner`` and ``service``
    name the key refused, once the caller proved its secret (for usage and logs;
    never rendered).
    """

    code: str
    detail: str | None = None
    scope: str | None = None
    retry_after: float | None = None
    headers: tuple[tuple[bytes, bytes], ...] = field(default=())
    key_id: str | None = field(default=None, compare=False)
    owner: str | None = field(default=None, compare=False)
    service: str | None = field(default=None, compare=False)

    @property
    def status(self) -> int:
        return TABLE[self.code].status


def deny(code: str, **details: object) -> Denial:
    """A :class:`Denial` for ``code``; an unknown code is a programming error."""
    if code not in TABLE:
        raise ConfigurationError(f"unknown denial code {code!r}")
    return Denial(code, **details)  # type: ignore[arg-type]


def _retry_after(seconds: float) -> int:
    """Whole seconds to wait: rounded up, at least 1, plus up to 10 % of jitter.

    Clients refused at the same moment would otherwise all come back at the same
    moment (ratelimit-headers draft §8.5). The jitter only ever adds time, so a retry
    after the advertised delay is still admitted (T72, T98). Below 10 s a whole second
    is already more than 10 %, so short waits are sent exactly.
    """
    base = max(1, math.ceil(seconds))
    return base + secrets.randbelow(base // 10 + 1)


def _challenge(entry: Entry, denial: Denial, realm: str) -> bytes | None:
    if entry.challenge is None:
        return None
    parts = [f'Bearer realm="{realm}"']
    if entry.challenge:
        parts.append(f'error="{entry.challenge}"')
        if entry.challenge == "invalid_token":
            parts.append('error_description="invalid or expired credential"')
        if denial.scope is not None and _SAFE_DETAIL.fullmatch(denial.scope):
            parts.append(f'scope="{denial.scope}"')
    challenge = ", ".join(parts)
    if entry.status == 401:
        challenge += f', ApiKey realm="{realm}"'
    return challenge.encode("ascii")


def render(denial: Denial, *, realm: str = "api") -> tuple[int, Headers, bytes]:
    """Status, headers and JSON body for a denial.

    Every refusal carries ``Cache-Control: no-store``; a 401 always carries a
    challenge (RFC 9110 §15.5.2); 429 and 503 carry ``Retry-After`` (jittered
    upwards, see :func:`_retry_after`) unless waiting cannot help.
    """
    entry = TABLE[denial.code]
    message = entry.message if denial.detail is None else f"{entry.message} ({denial.detail})"
    error: dict[str, object] = {"code": denial.code, "message": message, "type": entry.type}
    headers: Headers = [
        (b"content-type", b"application/json"),
        (b"cache-control", b"no-store"),
    ]
    if denial.scope is not None:
        error["scope"] = denial.scope
    if denial.retry_after is not None:
        seconds = _retry_after(denial.retry_after)
        error["retry_after"] = seconds
        headers.append((b"retry-after", str(seconds).encode()))
    challenge = _challenge(entry, denial, realm)
    if challenge is not None:
        headers.append((b"www-authenticate", challenge))
    headers.extend(denial.headers)
    body = json.dumps({"error": error}, separators=(",", ":")).encode()
    headers.append((b"content-length", str(len(body)).encode()))
    return entry.status, headers, body
