"""Parsing a token request: the form body and HTTP Basic client authentication.

Strict on purpose: RFC 6749 §3.2 forbids repeated parameters and §2.3 forbids more
than one client-authentication method, and both are refused rather than resolved by
picking one. Parsing never raises anything but :class:`FormError`, whose ``code`` is
an RFC 6749 §5.2 error code and whose message is fixed.
"""

from __future__ import annotations

import binascii
from base64 import b64decode
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote

__all__ = ["ClientAuth", "FormError", "client_auth", "parse_form"]

MAX_FIELDS = 16
MAX_FIELD = 2048
_FORM = "application/x-www-form-urlencoded"


class FormError(Exception):
    """A token request refused before the client is known."""

    def __init__(self, code: str, status: int = 400) -> None:
        super().__init__(code)
        self.code = code
        self.status = status


@dataclass(frozen=True, slots=True)
class ClientAuth:
    """Who the request says it is; the secret is checked later, in constant time."""

    client_id: str
    secret: str
    basic: bool


def parse_form(content_type: bytes | None, body: bytes) -> dict[str, str]:
    """The parameters of an ``application/x-www-form-urlencoded`` body."""
    media = (content_type or b"").split(b";", 1)[0].strip().lower()
    if media != _FORM.encode():
        raise FormError("invalid_request")
    try:
        text = body.decode("ascii")
        pairs = parse_qsl(
            text, keep_blank_values=True, strict_parsing=bool(text), max_num_fields=MAX_FIELDS
        )
    except (UnicodeDecodeError, ValueError):
        raise FormError("invalid_request") from None
    params: dict[str, str] = {}
    for name, value in pairs:
        if name in params or len(value) > MAX_FIELD or not value.isprintable():
            raise FormError("invalid_request")
        params[name] = value
    return params


def client_auth(authorization: list[bytes], params: dict[str, str]) -> ClientAuth:
    """The client's credentials, from ``Authorization: Basic`` or the form.

    :raises FormError: both methods, a malformed Basic header (400 ``invalid_request``),
        or no credentials at all (401 ``invalid_client``).
    """
    if len(authorization) > 1:
        raise FormError("invalid_request")
    basic = _basic(authorization[0]) if authorization else None
    if basic is not None:
        if "client_secret" in params:
            raise FormError("invalid_request")
        if params.get("client_id", basic.client_id) != basic.client_id:
            raise FormError("invalid_request")
        return basic
    client_id, secret = params.get("client_id"), params.get("client_secret")
    if not client_id or not secret:
        raise FormError("invalid_client", 401)
    return ClientAuth(client_id, secret, basic=False)


def _basic(value: bytes) -> ClientAuth | None:
    """RFC 6749 §2.3.1: ``base64(urlencode(id) ":" urlencode(secret))``; another scheme
    is not ours and reads as no credentials."""
    scheme, _, encoded = value.strip().partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        decoded = b64decode(encoded.strip(), validate=True).decode("ascii")
    except (binascii.Error, ValueError):
        raise FormError("invalid_request") from None
    raw_id, colon, raw_secret = decoded.partition(":")
    client_id, secret = unquote(raw_id.replace("+", " ")), unquote(raw_secret.replace("+", " "))
    if not colon or not client_id or not secret or len(decoded) > 2 * MAX_FIELD:
        raise FormError("invalid_request")
    return ClientAuth(client_id, secret, basic=True)
