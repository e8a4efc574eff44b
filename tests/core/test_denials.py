"""The one table of denials and the limit headers: exact, legal and parseable."""

from __future__ import annotations

import json

import pytest
from http_sfv.list import List as SfList
from hypothesis import given
from hypothesis import strategies as st

from keyguard.denials import TABLE, deny, render
from keyguard.errors import ConfigurationError
from keyguard.limiting import LimitKind, LimitState
from keyguard.ratelimit_headers import SF_INTEGER_MAX, limit_headers, tightest

LEGAL = set(range(0x20, 0x7F)) | {0x09}


def _legal(value: bytes) -> bool:
    return all(b in LEGAL for b in value)


@pytest.mark.parametrize("code", sorted(TABLE))
def test_every_denial_renders_the_documented_body(code: str) -> None:
    """Each code gives its status, the error body and no-store."""
    status, headers, body = render(
        deny(code, retry_after=1.2 if TABLE[code].status in {429, 503} else None)
    )
    entry = TABLE[code]
    assert status == entry.status
    error = json.loads(body)["error"]
    assert (error["code"], error["type"], error["message"]) == (code, entry.type, entry.message)
    names = dict(headers)
    assert names[b"cache-control"] == b"no-store"
    assert names[b"content-length"] == str(len(body)).encode()
    if status == 401:
        assert names[b"www-authenticate"].startswith(b'Bearer realm="api"')
    if status in {429, 503}:
        assert names[b"retry-after"] == b"2"
        assert error["retry_after"] == 2
    assert all(_legal(v) for _, v in headers)


def test_t1_missing_key_challenge_has_no_error() -> None:
    """No credential: a challenge with no error parameter (RFC 6750 §3.1)."""
    _, headers, _ = render(deny("missing_api_key"))
    challenge = dict(headers)[b"www-authenticate"]
    assert b"error" not in challenge
    assert b"ApiKey" in challenge


def test_insufficient_scope_names_the_scope() -> None:
    """A 403 says which scope was missing, in the body and the challenge."""
    _, headers, body = render(deny("insufficient_permissions", scope="image:create"))
    assert b'scope="image:create"' in dict(headers)[b"www-authenticate"]
    assert json.loads(body)["error"]["scope"] == "image:create"


def test_unknown_code_is_a_programming_error() -> None:
    """deny() refuses a code that is not in the table."""
    with pytest.raises(ConfigurationError):
        deny("nope")


def state(
    name: str,
    limit: int,
    remaining: int,
    reset: float,
    *,
    kind: LimitKind = LimitKind.WINDOW,
    window: int | None = 60,
) -> LimitState:
    return LimitState(name, kind, limit, remaining, reset, window)


def test_t73_ratelimit_headers_parse_as_structured_fields() -> None:
    """RateLimit and RateLimit-Policy are sf-Lists with one named Item per policy."""
    states = [
        state("minute", 60, 59, 59.2),
        state("day", 1000, -3, 3600.5, window=86400),
        state("concurrency", 5, 4, 0, kind=LimitKind.CONCURRENCY, window=None),
    ]
    headers = dict(limit_headers(states))
    policy = SfList()
    policy.parse(headers[b"ratelimit-policy"])
    assert [(i.value, dict(i.params)) for i in policy] == [
        ("minute", {"q": 60, "w": 60}),
        ("day", {"q": 1000, "w": 86400}),
        ("concurrency", {"q": 5, "qu": "concurrent-requests"}),
    ]
    current = SfList()
    current.parse(headers[b"ratelimit"])
    assert [(i.value, dict(i.params)) for i in current] == [
        ("minute", {"r": 59, "t": 60}),
        ("day", {"r": 0, "t": 3601}),
        ("concurrency", {"r": 4, "t": 0}),
    ]
    assert headers[b"x-ratelimit-limit"] == b"1000"
    assert headers[b"x-ratelimit-remaining"] == b"0"
    assert b"pk=" not in headers[b"ratelimit"]


@given(
    st.lists(
        st.tuples(
            st.text(max_size=80),
            st.integers(-(10**20), 10**20),
            st.floats(0, 1e20, allow_nan=False),
        ),
        min_size=1,
        max_size=5,
    )
)
def test_t99_limit_headers_are_always_legal(items: list[tuple[str, int, float]]) -> None:
    """Whatever the names and numbers, headers are legal bytes and parse."""
    states = [state(n, abs(v), v, r) for n, v, r in items]
    for _, value in limit_headers(states):
        assert _legal(value)
    parsed = SfList()
    parsed.parse(dict(limit_headers(states))[b"ratelimit"])
    for item in parsed:
        assert 0 <= item.params["r"] <= SF_INTEGER_MAX


def test_a_limit_name_with_percent_signs_is_sent_as_written() -> None:
    """The RateLimit value is a cached template the numbers fill in: a name's own
    ``%`` is text, never a hole."""
    headers = dict(limit_headers([state("100%d of %s", 10, 3, 1.5)]))
    assert headers[b"ratelimit"] == b'"100%d of %s";r=3;t=2'
    assert headers[b"ratelimit-policy"] == b'"100%d of %s";q=10;w=60'


def test_tightest_prefers_rate_windows_over_concurrency() -> None:
    """X-RateLimit-* describes a rate window unless only concurrency applies."""
    conc = state("concurrency", 5, 1, 0, kind=LimitKind.CONCURRENCY, window=None)
    minute = state("minute", 60, 50, 30)
    assert tightest([conc, minute]) is minute
    assert tightest([conc]) is conc
