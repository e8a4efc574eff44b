"""Checks for every value an admin operation accepts.

Each function returns the normalised value or raises :class:`InvalidInput` naming
the field; nothing is written before every value has passed.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta

from limits import parse_many

from .errors import InvalidInput, shown
from .records import JSON, LimitOverrides

__all__ = [
    "parse_duration",
    "validate_cidrs",
    "validate_expiry",
    "validate_label",
    "validate_limits",
    "validate_metadata",
    "validate_rate",
    "validate_reason",
    "validate_scopes",
]

MAX_LABEL = 200
MAX_SCOPES = 100
MAX_CIDRS = 200
MAX_METADATA_BYTES = 4096
MAX_RATE_STRING = 400
_SCOPE = re.compile(r"\*|[a-z0-9][a-z0-9_.\-]*(?::[a-z0-9][a-z0-9_.\-]*)*(?::\*)?")
_PLAN = re.compile(r"[a-z0-9][a-z0-9_\-]{0,62}")
_DURATION = re.compile(r"(\d{1,9})([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def _printable(field: str, value: object, *, max_len: int, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise InvalidInput(field, "must be a string")
    if len(value) > max_len:
        raise InvalidInput(field, f"must be at most {max_len} characters")
    if not value.isprintable():
        raise InvalidInput(field, "must not contain control characters")
    value = value.strip()
    if not value and not allow_empty:
        raise InvalidInput(field, "must not be empty")
    return value


def validate_label(field: str, value: object) -> str:
    """A name or owner: printable text, 1-200 characters."""
    return _printable(field, value, max_len=MAX_LABEL)


def validate_reason(value: object) -> str:
    """A revocation reason: printable text, may be empty."""
    return _printable("reason", value, max_len=MAX_LABEL, allow_empty=True)


def validate_plan(value: object) -> str:
    """A plan name: lower-case letters, digits, ``-`` and ``_``."""
    if not isinstance(value, str) or not _PLAN.fullmatch(value):
        raise InvalidInput("plan", f"{shown(value)} is not a plan name (a-z, 0-9, - and _)")
    return value


def validate_scopes(values: Iterable[object]) -> tuple[str, ...]:
    """Scopes such as ``text:generate``, ``image:*`` or ``*``; sorted and deduplicated."""
    if isinstance(values, str):
        raise InvalidInput("scopes", "must be a list of scopes, not one string")
    seen: set[str] = set()
    for value in values:
        if not isinstance(value, str) or len(value) > MAX_LABEL or not _SCOPE.fullmatch(value):
            raise InvalidInput(
                "scopes", f"{shown(value)} is not a scope (like 'text:generate' or 'image:*')"
            )
        seen.add(value)
        if len(seen) > MAX_SCOPES:
            raise InvalidInput("scopes", f"at most {MAX_SCOPES} scopes")
    return tuple(sorted(seen))


def validate_cidrs(values: Iterable[object]) -> tuple[str, ...]:
    """An IP allow-list: CIDRs or single addresses, IPv4 or IPv6, host bits clear.

    Strict parsing rejects the ambiguous forms (``010.0.0.1``, ``10.1``, integers);
    each entry is stored in its canonical spelling.
    """
    if isinstance(values, str):
        raise InvalidInput("ip_allow", "must be a list of networks, not one string")
    networks: list[str] = []
    for value in values:
        if not isinstance(value, str) or len(value) > 64:
            raise InvalidInput("ip_allow", f"{shown(value)} is not an IP network")
        try:
            network = ipaddress.ip_network(value, strict=True)
        except ValueError:
            raise InvalidInput(
                "ip_allow", f"{shown(value)} is not an IP network (like 203.0.113.0/24)"
            ) from None
        if str(network) not in networks:
            networks.append(str(network))
        if len(networks) > MAX_CIDRS:
            raise InvalidInput("ip_allow", f"at most {MAX_CIDRS} networks")
    return tuple(networks)


def validate_rate(value: object) -> str:
    """A limit string such as ``60/minute;1000/hour``, in the grammar of ``limits``."""
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_RATE_STRING:
        raise InvalidInput("limits", "must be a limit string such as '60/minute;1000/hour'")
    if not value.isprintable():
        raise InvalidInput("limits", "must not contain control characters")
    try:
        items = parse_many(value)
    except ValueError:
        raise InvalidInput(
            "limits", f"{shown(value)} is not a limit string such as '60/minute;1000/hour'"
        ) from None
    if not items or any(item.amount < 1 for item in items):
        raise InvalidInput("limits", "every limit must allow at least one request")
    periods = [item.multiples * item.GRANULARITY.seconds for item in items]
    if len(set(periods)) != len(periods):
        # Two windows of one length would share a counter and a header name.
        raise InvalidInput("limits", "each window length may appear only once")
    return ";".join(
        f"{item.amount}/{item.GRANULARITY.name}"
        if item.multiples == 1
        else f"{item.amount}/{item.multiples} {item.GRANULARITY.name}s"
        for item in items
    )


def _positive(field: str, value: object, *, zero_ok: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(field, "must be a whole number")
    if value < (0 if zero_ok else 1) or value > 10**15:
        raise InvalidInput(field, "must be between 1 and 10**15")
    return value


def validate_limits(limits: LimitOverrides) -> LimitOverrides:
    """Per-key overrides, each checked and normalised."""
    return LimitOverrides(
        rate=None if limits.rate is None else validate_rate(limits.rate),
        quota_daily=None
        if limits.quota_daily is None
        else _positive("quota_daily", limits.quota_daily),
        quota_monthly=None
        if limits.quota_monthly is None
        else _positive("quota_monthly", limits.quota_monthly),
        concurrency=None
        if limits.concurrency is None
        else _positive("concurrency", limits.concurrency),
    )


def parse_duration(field: str, value: str) -> timedelta:
    """``30s``, ``15m``, ``1h``, ``30d``, ``2w`` or a sum such as ``1h30m``; ``0`` is zero."""
    text = value.strip()
    if text == "0":
        return timedelta(0)
    pos, total = 0, 0
    while pos < len(text):
        match = _DURATION.match(text, pos)
        if match is None:
            raise InvalidInput(field, f"{shown(value)} is not a duration such as 30d or 1h")
        total += int(match[1]) * _UNITS[match[2]]
        pos = match.end()
    if not text or total > 100 * 365 * 86400:
        raise InvalidInput(field, f"{shown(value)} is not a duration such as 30d or 1h")
    return timedelta(seconds=total)


def validate_expiry(value: datetime | timedelta | str | None, now: datetime) -> datetime | None:
    """An expiry as a moment, a duration from ``now``, or text (``30d`` or ISO-8601).

    Naive datetimes are refused rather than guessed; the moment must be in the future.
    """
    if value is None:
        return None
    if isinstance(value, str):
        if len(value) > 64:
            raise InvalidInput("expires", "is too long")
        try:
            value = parse_duration("expires", text := value)
        except InvalidInput:
            try:
                value = datetime.fromisoformat(text.strip())
            except ValueError:
                raise InvalidInput(
                    "expires", f"{shown(value)} is neither a duration (30d) nor ISO-8601"
                ) from None
    if isinstance(value, timedelta):
        if value <= timedelta(0):
            raise InvalidInput("expires", "must be in the future")
        return now + value
    if value.tzinfo is None:
        raise InvalidInput("expires", "must include a time zone (e.g. 2027-01-01T00:00:00Z)")
    value = value.astimezone(UTC)
    if value <= now:
        raise InvalidInput("expires", "must be in the future")
    return value


def validate_metadata(value: object) -> dict[str, JSON]:
    """A JSON object of at most 4 KiB once encoded."""
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise InvalidInput("metadata", "must be a JSON object with string keys")
    try:
        encoded = json.dumps(value, allow_nan=False, separators=(",", ":"), sort_keys=True)
    except (TypeError, ValueError, RecursionError):
        raise InvalidInput("metadata", "must be plain JSON (no NaN, keys are strings)") from None
    if len(encoded.encode()) > MAX_METADATA_BYTES:
        raise InvalidInput("metadata", f"must be at most {MAX_METADATA_BYTES} bytes as JSON")
    if "\\u0000" in encoded:
        raise InvalidInput("metadata", "must not contain NUL characters")
    decoded: dict[str, JSON] = json.loads(encoded)
    if decoded != value:  # non-string keys or tuples would be silently converted
        raise InvalidInput("metadata", "must be plain JSON (string keys, lists, no tuples)")
    return decoded
