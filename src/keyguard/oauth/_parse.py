"""The small parsers of JWT validation: strict base64url, strict JSON, NumericDate.

Each refuses with :class:`~keyguard.oauth.claims.InvalidToken` and never raises
anything else, whatever the input (RFC 8725 §2.6: duplicate members and other
multiplicities are refused, not resolved).
"""

from __future__ import annotations

import binascii
import json
import math
from base64 import urlsafe_b64decode, urlsafe_b64encode
from typing import Any

from .claims import InvalidToken

__all__ = ["audiences", "b64", "date", "json_object", "media_type", "text"]

_MAX_DATE = 253_402_300_799.0  # 9999-12-31T23:59:59Z: beyond it a date is garbage
_MAX_TEXT_CLAIM = 1024


def media_type(value: str) -> str:
    """``typ`` compared as a media type: case-insensitive, ``application/`` implied."""
    lowered = value.strip().lower()
    return lowered.removeprefix("application/")


def b64(segment: str) -> bytes:
    """Strict base64url (the alphabet is already checked): canonical, no padding."""
    try:
        raw = urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError):
        raise InvalidToken("malformed") from None
    if urlsafe_b64encode(raw).rstrip(b"=") != segment.encode():
        raise InvalidToken("malformed")  # stray bits: one token, one spelling
    return raw


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose every member name is distinct (RFC 8725 §2.6)."""
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate member")
    return result


def json_object(raw: bytes, *, forged: bool) -> dict[str, Any]:
    """A UTF-8 JSON object with distinct member names."""
    try:
        value = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError):
        raise InvalidToken("malformed", forged=forged) from None
    if not isinstance(value, dict):
        raise InvalidToken("malformed", forged=forged)
    return value


def audiences(value: object) -> frozenset[str]:
    """``aud`` as a set: a string or an array of strings; anything else is empty."""
    if isinstance(value, str):
        return frozenset((value,))
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return frozenset(value)
    return frozenset()


def date(value: object, *, optional: bool = False) -> float | None:
    """A NumericDate: a finite number between 0 and year 9999; ``None`` if absent."""
    if value is None and optional:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not 0 <= value <= _MAX_DATE
    ):
        raise InvalidToken("date", forged=False)
    return float(value)


def text(value: object) -> str | None:
    """A string claim of sensible length, else ``None``."""
    if isinstance(value, str) and 0 < len(value) <= _MAX_TEXT_CLAIM:
        return value
    return None
