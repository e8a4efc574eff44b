"""Every admin input is checked, normalised, and refused with a message naming the field."""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keyguard.errors import InvalidInput
from keyguard.records import LimitOverrides
from keyguard.validation import (
    parse_duration,
    validate_cidrs,
    validate_expiry,
    validate_label,
    validate_limits,
    validate_metadata,
    validate_rate,
    validate_scopes,
)

NOW = datetime(2027, 1, 1, tzinfo=UTC)


def _strict(text: str) -> str | None:
    try:
        return str(ipaddress.ip_network(text, strict=True))
    except ValueError:
        return None


@given(
    st.one_of(
        st.ip_addresses().map(str),
        st.text(max_size=50),
        st.builds(lambda a, n: f"{a}/{n}", st.ip_addresses(), st.integers(0, 130)),
    )
)
def test_cidr_validation_agrees_with_ipaddress(text: str) -> None:
    """An entry is accepted exactly when ipaddress parses it strictly, and canonicalised."""
    expected = _strict(text) if len(text) <= 64 else None
    if expected is None:
        with pytest.raises(InvalidInput, match="ip_allow"):
            validate_cidrs([text])
    else:
        assert validate_cidrs([text]) == (expected,)


@pytest.mark.parametrize(
    "value", ["10.0.0.1/8", "010.0.0.1", "10.1", "167772161", "0xA.0.0.1", " 10.0.0.1", "", "*"]
)
def test_ambiguous_or_host_bit_networks_are_refused(value: str) -> None:
    """Host bits, octal-looking octets, short forms, integers and spaces are refused."""
    with pytest.raises(InvalidInput):
        validate_cidrs([value])


def test_cidr_list_must_be_a_list() -> None:
    """One string is not silently split into characters."""
    with pytest.raises(InvalidInput):
        validate_cidrs("10.0.0.0/8")


@pytest.mark.parametrize(
    "scope", ["Text:generate", "text:generate ", "text\uff1agenerate", "", "a::b", "text:*:x", "**"]
)
def test_bad_scopes_are_refused(scope: str) -> None:
    """Upper case, trailing spaces, look-alike colons and malformed wildcards are refused."""
    with pytest.raises(InvalidInput, match="scopes"):
        validate_scopes([scope])


def test_scopes_are_sorted_and_deduplicated() -> None:
    """The stored scope list is canonical."""
    assert validate_scopes(["image:*", "text:generate", "image:*", "*"]) == (
        "*",
        "image:*",
        "text:generate",
    )


@pytest.mark.parametrize("value", ["", "x" * 201, "a\x00b", "a\nb", 5])
def test_bad_labels_are_refused(value: object) -> None:
    """Names are printable, non-empty and bounded."""
    with pytest.raises(InvalidInput, match="name"):
        validate_label("name", value)


def test_unicode_names_are_kept() -> None:
    """Printable Unicode is a fine name."""
    assert validate_label("name", " Zoë's bot 🚀 ") == "Zoë's bot 🚀"


@pytest.mark.parametrize(
    "value", ["", "60/fortnight", "0/minute", "minute", "1/minute\x00", "9" * 500]
)
def test_bad_limit_strings_are_refused(value: str) -> None:
    """Limit strings must parse and allow at least one request."""
    with pytest.raises(InvalidInput, match="limits"):
        validate_rate(value)


def test_limit_strings_are_normalised() -> None:
    """Separators and spellings collapse to one canonical form."""
    assert validate_rate("60 per minute; 1000/hour;10/2 days") == "60/minute;1000/hour;10/2 days"


@pytest.mark.parametrize(
    "overrides",
    [
        LimitOverrides(quota_daily=0),
        LimitOverrides(concurrency=-1),
        LimitOverrides(quota_monthly=True),
        LimitOverrides(quota_monthly=10**16),
    ],
)
def test_bad_quota_numbers_are_refused(overrides: LimitOverrides) -> None:
    """Quotas and concurrency are positive whole numbers."""
    with pytest.raises(InvalidInput):
        validate_limits(overrides)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("15m", 900), ("1h30m", 5400), ("30d", 2592000), ("2w", 1209600), ("0", 0)],
)
def test_durations(text: str, seconds: int) -> None:
    """Durations are sums of number-unit pairs."""
    assert parse_duration("grace", text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "1y", "-1h", "1.5h", "h", "9999999999d"])
def test_bad_durations_are_refused(text: str) -> None:
    """Anything else is refused, naming the field."""
    with pytest.raises(InvalidInput, match="grace"):
        parse_duration("grace", text)


def test_expiry_forms() -> None:
    """Durations count from now; ISO-8601 needs a zone and must be in the future."""
    assert validate_expiry("30d", NOW) == NOW + timedelta(days=30)
    assert validate_expiry("2027-02-01T00:00:00Z", NOW) == datetime(2027, 2, 1, tzinfo=UTC)
    for bad in ("2027-02-01T00:00:00", "2026-01-01T00:00:00Z", "tomorrow", "x" * 100):
        with pytest.raises(InvalidInput, match="expires"):
            validate_expiry(bad, NOW)


@pytest.mark.parametrize(
    "value",
    [[1], "x", {"a": float("nan")}, {1: 2}, {"a": "x" * 5000}, {"a": "\x00"}, {"a": {1, 2}}],
)
def test_bad_metadata_is_refused(value: object) -> None:
    """Metadata is a bounded JSON object of plain values."""
    with pytest.raises(InvalidInput, match="metadata"):
        validate_metadata(value)


def test_error_messages_do_not_echo_huge_values() -> None:
    """An echoed value is truncated and made printable."""
    with pytest.raises(InvalidInput) as info:
        validate_scopes(["X" * 10_000 + "\n"])
    assert len(str(info.value)) < 200


@pytest.mark.parametrize(
    "value", ["100/minute;1000/minute", "10/second;20/second", "60/minute;1/60 seconds"]
)
def test_two_windows_of_one_length_are_refused(value: str) -> None:
    """Windows of equal length would share a counter and a header name: refused up front."""
    with pytest.raises(InvalidInput, match="limits"):
        validate_rate(value)
