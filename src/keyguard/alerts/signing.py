"""Webhook signatures, Stripe-style: ``X-Keyguard-Signature: t=<unix>,v1=<hex>``.

``v1`` is HMAC-SHA256, keyed with the webhook secret, of ``"<t>.<body>"``. Signing
the timestamp with the body lets a receiver refuse a captured request replayed later
(``tolerance``); the event id header (``X-Keyguard-Event-Id``) lets it drop a retry
of something it already handled. Each attempt is signed afresh, so a retry an hour
later still carries a current timestamp.
"""

from __future__ import annotations

import hashlib
import hmac
import time

__all__ = [
    "EVENT_ID_HEADER",
    "EVENT_KIND_HEADER",
    "SIGNATURE_HEADER",
    "sign",
    "signature_header",
    "verify_signature",
]

SIGNATURE_HEADER = "X-Keyguard-Signature"
EVENT_ID_HEADER = "X-Keyguard-Event-Id"
EVENT_KIND_HEADER = "X-Keyguard-Event"
_MAX_HEADER = 4096  # a header is a few hundred bytes; refuse to parse megabytes


def _bytes(value: str | bytes) -> bytes:
    return value.encode() if isinstance(value, str) else value


def sign(secret: str | bytes, timestamp: int, body: bytes) -> str:
    """The hex HMAC-SHA256 of ``"<timestamp>.<body>"``."""
    message = str(timestamp).encode() + b"." + body
    return hmac.new(_bytes(secret), message, hashlib.sha256).hexdigest()


def signature_header(secret: str | bytes, body: bytes, timestamp: int | None = None) -> str:
    """The value of ``X-Keyguard-Signature`` for ``body``, signed now."""
    t = int(time.time()) if timestamp is None else timestamp
    return f"t={t},v1={sign(secret, t, body)}"


def verify_signature(
    secret: str | bytes,
    header: str | None,
    body: bytes,
    tolerance: float = 300,
    now: float | None = None,
) -> bool:
    """Whether ``header`` is a valid keyguard signature of ``body`` made recently.

    For receivers: pass the raw request body (before any JSON parsing), the
    ``X-Keyguard-Signature`` value and the webhook secret. ``False`` for a missing or
    malformed header, a timestamp more than ``tolerance`` seconds from ``now`` (either
    way), or no ``v1`` entry matching. Comparison is constant-time. Several ``v1``
    entries are accepted, so a sender may sign with an old and a new secret while
    rotating.

    **Security note:** a valid signature proves origin and freshness, not uniqueness:
    also keep the event ids seen in the last ``tolerance`` seconds and refuse repeats.
    """
    if not header or len(header) > _MAX_HEADER:
        return False
    timestamp: int | None = None
    candidates: list[str] = []
    for item in header.split(","):
        name, sep, value = item.strip().partition("=")
        if not sep:
            return False
        if name == "t":
            if timestamp is not None or not (value.isascii() and value.isdigit()):
                return False
            timestamp = int(value)
        elif name == "v1":
            candidates.append(value)
    if timestamp is None or not candidates:
        return False
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance:
        return False
    expected = sign(secret, timestamp, body).encode()
    found = False
    for candidate in candidates:
        found |= hmac.compare_digest(expected, candidate.encode("ascii", "replace"))
    return found
