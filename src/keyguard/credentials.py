"""Finding the one credential a request presents, and hiding it from the app.

keyguard accepts exactly one credential from exactly one method per request (RFC 6750
§2: "Clients MUST NOT use more than one method"). Everything ambiguous is refused
rather than resolved by picking one: two methods, repeated header lines, a
comma-joined value, a repeated query parameter. A server that picks the first value
and a proxy that picks the last are how header-smuggling bypasses start.

:func:`extract_credential` has four outcomes, which an adapter maps to responses:

======================================  ============================================
outcome                                 response (SECURITY.md a.10)
======================================  ============================================
``None``                                401, challenge without ``error`` (no credential)
:class:`Credential`                     look the key up
:class:`MalformedCredential` raised     400 ``invalid_request``
other :class:`InvalidCredential` raised 401 ``invalid_token``, as for an unknown key
======================================  ============================================

The last row covers values that parse as a header but cannot be a key: longer than
``max_length`` (refused after a length check alone, before decoding or hashing,
SECURITY.md T8), or with characters outside the token68 alphabet in ``X-API-Key`` or
after decoding a query value (T3, T11). Nothing here logs, and no exception carries
request data.

.. versionadded:: 0.1
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final, Literal
from urllib.parse import unquote_to_bytes

from .errors import ConfigurationError, InvalidCredential, shown
from .keys import Secret
from .request import RequestInfo

__all__ = [
    "Credential",
    "CredentialConfig",
    "CredentialMethod",
    "MalformedCredential",
    "extract_credential",
    "strip_credential_headers",
    "strip_credential_query",
    "strip_credentials",
]

CredentialMethod = Literal["header", "bearer", "query"]
_METHODS: Final = ("header", "bearer", "query")
_HEADER_NAME = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
_PARAM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
_AUTHORIZATION: Final = b"authorization"
# RFC 6750 b64token / RFC 9110 token68, without the trailing "=" padding.
_TOKEN68: Final = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~+/"
# What a header field value may hold besides token68 (RFC 9110 §5.5): visible ASCII,
# SP and HTAB. Anything else (NUL, CR, LF, DEL, other controls, bytes >= 0x80) is bad.
_FIELD_TEXT: Final = bytes(range(0x21, 0x7F)) + b" \t"
# tchar (RFC 9110 §5.6.2): a scheme that merely starts with "bearer" ("BearerX").
_TCHAR: Final = frozenset(_TOKEN68.replace(b"/", b"") + b"!#$%&'*^`|")
_OWS: Final = b" \t"
_SCHEME_SLACK = 64  # "Bearer" plus the spaces before the token


class MalformedCredential(InvalidCredential):
    """The request's credentials do not parse, or are ambiguous: answer 400.

    ``reason`` is always ``"malformed_request"``; ``detail`` is a fixed word for logs
    and metrics (``duplicate_header``, ``multiple_methods``, ...), never request data.
    """

    def __init__(self, detail: str) -> None:
        super().__init__("malformed_request")
        self.detail = detail


@dataclass(frozen=True, slots=True)
class CredentialConfig:
    """Where this deployment accepts keys.

    :param methods: the methods read, any of ``header`` (``X-API-Key``), ``bearer``
        (``Authorization: Bearer``) and ``query``. Query parameters end up in access
        logs and browser history (RFC 6750 §2.3), so ``query`` is off by default.
    :param header_name: the key header, lower-case with hyphens. Underscores are
        refused: CGI and WSGI map ``X_API_Key`` and ``X-API-Key`` to the same
        variable, and proxies drop or keep such names inconsistently.
    :param query_param: the query parameter, when ``query`` is enabled.
    :param max_length: the longest credential accepted, checked before anything else.
    """

    methods: tuple[CredentialMethod, ...] = ("header", "bearer")
    header_name: str = "x-api-key"
    query_param: str = "api_key"
    max_length: int = 512
    _header_key: bytes | None = field(init=False, repr=False, compare=False)
    _auth_key: bytes | None = field(init=False, repr=False, compare=False)
    _query_key: bytes | None = field(init=False, repr=False, compare=False)
    _query_pattern: re.Pattern[bytes] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        methods = tuple(self.methods)
        if not methods or len(set(methods)) != len(methods) or not set(methods) <= {*_METHODS}:
            raise ConfigurationError(
                f"methods {shown(methods)} must be distinct values from {_METHODS}"
            )
        if not isinstance(self.header_name, str) or not _HEADER_NAME.fullmatch(self.header_name):
            raise ConfigurationError(
                f"header_name {shown(self.header_name)} must be lower-case letters, digits "
                "and single hyphens (no underscores)"
            )
        if self.header_name == "authorization":
            raise ConfigurationError("header_name must not be 'authorization'; use 'bearer'")
        if (
            not isinstance(self.query_param, str)
            or len(self.query_param) > 64
            or not _PARAM_NAME.fullmatch(self.query_param)
        ):
            raise ConfigurationError(
                f"query_param {shown(self.query_param)} must be letters, digits, '_', '.', '-'"
            )
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int):
            raise ConfigurationError("max_length must be a whole number")
        if not 16 <= self.max_length <= 16384:
            raise ConfigurationError(f"max_length {self.max_length} must be 16 to 16384")
        _set = object.__setattr__
        _set(self, "methods", methods)
        _set(self, "_header_key", self.header_name.encode() if "header" in methods else None)
        _set(self, "_auth_key", _AUTHORIZATION if "bearer" in methods else None)
        query = "query" in methods
        _set(self, "_query_key", self.query_param.encode() if query else None)
        _set(self, "_query_pattern", _param_pattern(self.query_param) if query else None)


@dataclass(frozen=True, slots=True)
class Credential:
    """The one credential a request presented; the value is a masked :class:`Secret`."""

    method: CredentialMethod
    value: Secret


def extract_credential(request: RequestInfo, config: CredentialConfig) -> Credential | None:
    """The request's credential, ``None`` when it has none (see the module table).

    Only the enabled methods are read: an ``Authorization: Basic`` header, or any
    ``Authorization`` when ``bearer`` is off, belongs to the app and is ignored.

    :raises MalformedCredential: two methods, repeated lines or parameters, a
        comma-joined header, ``Bearer`` without a token or with a tab, a bearer token
        outside the b64token grammar, or bad bytes in ``X-API-Key``.
    :raises InvalidCredential: a value that parses but cannot be a key.
    """
    key_name, auth_name = config._header_key, config._auth_key
    key_lines: list[bytes] = []
    auth_lines: list[bytes] = []
    for name, value in request.headers:
        if name == key_name:
            key_lines.append(value)
        elif name == auth_name:
            auth_lines.append(value)
    limit = config.max_length
    found: list[tuple[CredentialMethod, bytes]] = []
    if key_lines and (raw := _key_header(key_lines, limit)) is not None:
        found.append(("header", raw))
    if auth_lines and (raw := _bearer_token(auth_lines, limit)) is not None:
        found.append(("bearer", raw))
    if request.query_string and (raw := _query_value(request.query_string, config, limit)):
        found.append(("query", raw))
    if not found:
        return None
    if len(found) > 1:
        raise MalformedCredential("multiple_methods")
    method, raw = found[0]
    _check_token(method, raw)
    return Credential(method, Secret(raw.decode("ascii")))


def _key_header(lines: list[bytes], limit: int) -> bytes | None:
    if len(lines) > 1:
        raise MalformedCredential("duplicate_header")
    value = lines[0]
    if len(value) > limit:
        raise InvalidCredential("oversized")
    return value.strip(_OWS) or None


def _bearer_token(lines: list[bytes], limit: int) -> bytes | None:
    if len(lines) > 1:
        # Authorization is a singleton field; two lines are never a valid request.
        raise MalformedCredential("duplicate_header")
    value = lines[0]
    if value[:1] in (b" ", b"\t"):
        value = value.lstrip(_OWS)
    if value[:6].lower() != b"bearer":
        return None  # another scheme: not ours, so "no credential"
    follow = value[6:7]
    if follow and follow != b" " and follow[0] in _TCHAR:
        return None  # "BearerX ...": a different scheme
    if follow != b" ":
        raise MalformedCredential("bearer_syntax")  # "Bearer", "Bearer\t..."
    if len(value) > limit + _SCHEME_SLACK:
        raise InvalidCredential("oversized")
    token = value[7:].strip(_OWS)
    if not token:
        raise MalformedCredential("bearer_syntax")
    if len(token) > limit:
        raise InvalidCredential("oversized")
    return token


def _query_value(query: bytes, config: CredentialConfig, limit: int) -> bytes | None:
    name, pattern = config._query_key, config._query_pattern
    if name is None or pattern is None or (name not in query and b"%" not in query):
        return None  # the common case: one substring search, no parsing
    found: bytes | None = None
    for match in pattern.finditer(query):
        if found is not None:
            raise MalformedCredential("duplicate_query")
        found = match[1] or b""
    if not found:
        return None  # absent, or present and empty: both are "no credential"
    if len(found) > 3 * limit or found.count(b"%") > limit:
        raise InvalidCredential("oversized")  # checked before decoding: bounded work
    value = _decode_component(found)
    if len(value) > limit:
        raise InvalidCredential("oversized")
    return value or None


def _param_pattern(name: str) -> re.Pattern[bytes]:
    """Matches each ``name[=value]`` parameter whose name decodes to ``name``.

    Every character may arrive literally or as ``%XX`` (either case of hex), which is
    what one form-decoding gives; ``+`` decodes to a space, which no name holds. One
    regular expression scans the whole query in C: no per-parameter Python work, so a
    100 KiB query of ``&&&...`` costs about a millisecond (SECURITY.md T90). Each
    alternative starts with a distinct byte, so nothing backtracks.
    """
    chars = []
    for char in name:
        code = f"{ord(char):02X}"
        escaped = "%" + "".join(f"[{d}{d.lower()}]" if d.isalpha() else d for d in code)
        chars.append(f"(?:{re.escape(char)}|{escaped})")
    return re.compile(f"(?<![^&]){''.join(chars)}(?:=([^&]*+))?(?![^&])".encode())


def _decode_component(raw: bytes) -> bytes:
    """Form-decode once, as Starlette and werkzeug do: ``+`` is a space, then ``%XX``."""
    if b"%" not in raw and b"+" not in raw:
        return raw
    return unquote_to_bytes(raw.replace(b"+", b" "))


def _check_token(method: CredentialMethod, raw: bytes) -> None:
    body = raw.rstrip(b"=")
    junk = body.translate(None, _TOKEN68)
    if body and not junk:
        return
    if method == "bearer":
        raise MalformedCredential("bearer_syntax")  # RFC 6750: the header does not parse
    if method == "header" and junk.translate(None, _FIELD_TEXT):
        raise MalformedCredential("bad_bytes")  # RFC 9110 §5.5: reject the message
    if method == "header" and b"," in junk:
        raise MalformedCredential("comma_joined")  # a WSGI server joined two lines
    raise InvalidCredential("malformed")


def strip_credential_headers(
    headers: Iterable[tuple[bytes, bytes]], config: CredentialConfig
) -> list[tuple[bytes, bytes]]:
    """A copy of ``headers`` without the credential headers, for the app downstream.

    Removes every key-header line (when ``header`` is enabled) and every
    ``Authorization`` line with the ``Bearer`` scheme (when ``bearer`` is enabled);
    other ``Authorization`` schemes belong to the app and are kept.
    """
    key_name, auth_name = config._header_key, config._auth_key
    return [
        (name, value)
        for name, value in headers
        if name != key_name
        and not (name == auth_name and value.lstrip(_OWS)[:6].lower() == b"bearer")
    ]


def strip_credential_query(query_string: bytes, config: CredentialConfig) -> bytes:
    """``query_string`` without the key parameter; other parameters keep their order
    and their exact encoding. Unchanged when ``query`` is not enabled.
    """
    name, pattern = config._query_key, config._query_pattern
    if name is None or pattern is None or (name not in query_string and b"%" not in query_string):
        return query_string
    kept: list[bytes] = []
    cursor = -1
    for match in pattern.finditer(query_string):
        start, end = match.span()
        # The text between two key parameters is "&", "&&" or "&...&": keep the
        # parameters inside it, exactly as splitting on "&" and dropping ours would.
        if cursor < 0:
            if start > 0:
                kept.append(query_string[: start - 1])
        elif start - cursor > 1:
            kept.append(query_string[cursor + 1 : start - 1])
        cursor = end
    if cursor < 0:
        return query_string
    if cursor < len(query_string):
        kept.append(query_string[cursor + 1 :])
    return b"&".join(kept)


def strip_credentials(
    request: RequestInfo, config: CredentialConfig
) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """``(headers, query_string)`` of ``request`` without its credentials: new objects,
    ready for a copy of the ASGI scope or the WSGI environ passed downstream (T66).
    """
    return (
        strip_credential_headers(request.headers, config),
        strip_credential_query(request.query_string, config),
    )
