"""Limit state as response headers.

``RateLimit-Policy`` and ``RateLimit`` follow draft-ietf-httpapi-ratelimit-headers-11
(Structured Field Lists, one Item per policy, every window named); the widely used
``X-RateLimit-Limit/Remaining/Reset`` describe the tightest limit. No partition key
is ever sent, so nothing about the key leaks into a header (T67).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache

from .limiting import LimitKind, LimitState

__all__ = ["limit_headers", "policy_header", "tightest"]

Headers = list[tuple[bytes, bytes]]
SF_INTEGER_MAX = 999_999_999_999_999
_NAME = re.compile(r"[\x20-\x21\x23-\x5b\x5d-\x7e]{1,64}")


def _int(value: float) -> int:
    """A non-negative sf-integer: rounded up, clamped to 15 digits."""
    if value <= 0:
        return 0
    whole = int(value)
    if whole < value:
        whole += 1
    return whole if whole <= SF_INTEGER_MAX else SF_INTEGER_MAX


@lru_cache(maxsize=1024)
def _safe_name(name: str) -> str:
    # Names come from configuration; anything outside sf-string's printable set is
    # replaced rather than trusted, so a header can never be broken (T99).
    return name if _NAME.fullmatch(name) else "limit"


def _policy_item(state: LimitState) -> str:
    item = f'"{_safe_name(state.name)}";q={_int(state.limit)}'
    if state.kind is LimitKind.CONCURRENCY:
        return item + ';qu="concurrent-requests"'
    if state.window_seconds:
        item += f";w={_int(state.window_seconds)}"
    return item


@lru_cache(maxsize=1024)
def _policy_value(items: tuple[tuple[str, LimitKind, int, int | None], ...]) -> bytes:
    return ",".join(
        _policy_item(LimitState(name, kind, limit, 0, 0.0, seconds))
        for name, kind, limit, seconds in items
    ).encode("ascii")


def policy_header(states: Sequence[LimitState]) -> bytes:
    """The ``RateLimit-Policy`` value; it changes only when the policy does (cached)."""
    return _policy_value(tuple((s.name, s.kind, s.limit, s.window_seconds) for s in states))


def tightest(states: Sequence[LimitState]) -> LimitState:
    """The rate limit a client will meet first: least remaining, then the longest wait.

    The concurrency cap is a different kind of limit (slots come back when responses
    end), so it describes ``X-RateLimit-*`` only when nothing else applies.
    """
    counted = [s for s in states if s.kind is not LimitKind.CONCURRENCY] or states
    return min(counted, key=lambda s: (s.remaining, -s.reset_after))


def limit_headers(states: Sequence[LimitState]) -> Headers:
    """Every limit-state header for a response; empty when no limit applies.

    On every allowed response, so written for speed: one pass over the states collects
    their numbers and the policy's shape, which finds the cached ``RateLimit-Policy``
    value and a ``RateLimit`` template the numbers fill in one ``%`` (a tuple of
    strings, ints and bools hashes in C; one holding the ``LimitKind`` enum would call
    Python per state).
    """
    if not states:
        return []
    numbers: list[int] = []
    shape = []
    tight = None
    for name, kind, limit, left, reset_after, seconds in states:
        # remaining is an int from every built-in store; reset_after a float >= 0.
        remaining = left if 0 <= left <= SF_INTEGER_MAX else _int(left)
        reset = 0  # _int(reset_after), inline
        if reset_after > 0:
            reset = int(reset_after)
            if reset < reset_after:
                reset += 1
            if reset > SF_INTEGER_MAX:  # noqa: PLR1730 - min() is a call, per state
                reset = SF_INTEGER_MAX
        numbers.append(remaining)
        numbers.append(reset)
        capped = kind is _CONCURRENCY
        shape.append((name, capped, limit, seconds))
        if not capped and (
            tight is None or remaining < tight[1] or (remaining == tight[1] and reset > tight[2])
        ):
            tight = (limit, remaining, reset)
    key = tuple(shape)
    forms = _FORMS.get(key)
    if forms is None:
        forms = _forms_of(key, states)
    if tight is None:  # only a concurrency cap applies
        only = states[0]
        tight = (only.limit, _int(only.remaining), _int(only.reset_after))
    return [
        (b"ratelimit-policy", forms[0]),
        (b"ratelimit", forms[1] % tuple(numbers)),
        (b"x-ratelimit-limit", b"%d" % _int(tight[0])),
        (b"x-ratelimit-remaining", b"%d" % tight[1]),
        (b"x-ratelimit-reset", b"%d" % tight[2]),
    ]


# A plain dict, bounded by clearing: on the hot path a dict lookup is cheaper than an
# lru_cache call, and policies come from configuration (a few of them).
_FORMS: dict[tuple[tuple[str, bool, int, int | None], ...], tuple[bytes, bytes]] = {}
_CACHE_MAX = 1024


def _forms_of(
    key: tuple[tuple[str, bool, int, int | None], ...], states: Sequence[LimitState]
) -> tuple[bytes, bytes]:
    """A policy's ``RateLimit-Policy`` value, and its ``RateLimit`` value with a
    ``%d`` for each number (a name's own ``%`` doubled: names may hold one)."""
    if len(_FORMS) >= _CACHE_MAX:
        _FORMS.clear()
    items = ('"' + _safe_name(s.name).replace("%", "%%") + '";r=%d;t=%d' for s in states)
    template = ",".join(items).encode("ascii")
    forms = _FORMS[key] = (policy_header(states), template)
    return forms


_CONCURRENCY = LimitKind.CONCURRENCY
