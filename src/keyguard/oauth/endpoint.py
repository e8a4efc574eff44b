"""The token endpoint (client-credentials grant, RFC 6749 §4.4) and the JWKS route.

One sans-IO core, :class:`TokenEndpoint`, turns a request (a
:class:`~keyguard.request.RequestInfo` and its body) into a :class:`Reply`, as a flow
whose only I/O is the key lookup; :class:`OAuthASGI` and :class:`OAuthWSGI` are the
thin faces. Each serves two paths and passes every other request to the wrapped app
(or answers 404 when it stands alone)::

    POST /oauth/token            grant_type=client_credentials, client_id=<key id>,
                                 client_secret=<key> (form or HTTP Basic), scope=...
    GET  /.well-known/jwks.json  the issuer's public keys

A client is the key: ``client_id`` is the key's id and ``client_secret`` the key
itself. The secret is checked exactly as the guard checks a key (same format, digest,
status, rotation grace) and the id must be that key's id. A revoked or expired key
gets ``invalid_client`` at once, so no new token. Errors follow RFC 6749 §5.2, with
``Cache-Control: no-store`` on every answer and fixed descriptions that echo nothing.

.. versionadded:: 0.2
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..adapters.asgi import ASGIApp
from ..adapters.wsgi import WSGIApp
from ..backends.protocols import AsyncKeyStore, KeyBackend, KeyStore
from ..clock import Clock, SystemClock
from ..errors import ConfigurationError, InvalidCredential, InvalidInput, StorageError
from ..flows import Op, run_async, run_sync
from ..iprules import IPAllowList
from ..keys import KeyFormat, KeyHasher, Secret
from ..manager import KeyFlows
from ..proxies import TrustedProxies
from ..request import RequestInfo
from ..validation import validate_scopes
from ._forms import FormError, client_auth, parse_form
from .claims import MAX_SCOPES, scope_covers
from .issuer import TokenIssuer
from .mount import OAuthASGI, OAuthWSGI

if TYPE_CHECKING:
    from ..guard import Guard

__all__ = ["OAuthASGI", "OAuthWSGI", "Reply", "TokenEndpoint"]

_logger = logging.getLogger("keyguard")
_DESCRIPTIONS = {
    "invalid_request": "The request is missing a parameter or is malformed.",
    "invalid_client": "Client authentication failed.",
    "unsupported_grant_type": "Only the client_credentials grant is supported.",
    "invalid_scope": "The requested scope is invalid or exceeds the key's scopes.",
    "temporarily_unavailable": "The server cannot issue tokens right now.",
    "not_found": "Not found.",
    "method_not_allowed": "Method not allowed.",
}
TokenFlow = Generator[Op[KeyStore, AsyncKeyStore, Any], Any, "Reply"]


@dataclass(frozen=True, slots=True)
class Reply:
    """A response: status, headers (lower-case names) and body."""

    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes


def _json(status: int, document: dict[str, Any], *extra: tuple[bytes, bytes]) -> Reply:
    body = json.dumps(document, separators=(",", ":")).encode()
    headers = (
        (b"content-type", b"application/json"),
        (b"cache-control", b"no-store"),
        (b"pragma", b"no-cache"),
        *extra,
        (b"content-length", str(len(body)).encode()),
    )
    return Reply(status, headers, body)


class TokenEndpoint:
    """Issues tokens for keys: the core behind :class:`OAuthASGI` and :class:`OAuthWSGI`.

    :param issuer: the :class:`~keyguard.oauth.issuer.TokenIssuer` that signs tokens.
    :param keys: the key store (both faces) the clients' keys live in.
    :param key_format: the deployment's key format (as the guard's).
    :param hasher: the deployment's hasher, with its pepper (as the guard's).
    :param proxies: whose forwarding headers to believe, for keys with an IP allow-list.
    :param clock: the time source.
    :param token_path: where the token endpoint answers.
    :param jwks_path: where the public keys are served.
    :param max_body: the largest form body read (8 KiB).
    :param realm: the ``realm`` of the ``Basic`` challenge on 401.

    Use :meth:`from_guard` to share the guard's store, format, hasher, proxies, clock.
    """

    def __init__(
        self,
        *,
        issuer: TokenIssuer,
        keys: KeyBackend,
        key_format: KeyFormat | None = None,
        hasher: KeyHasher | None = None,
        proxies: TrustedProxies | None = None,
        clock: Clock | None = None,
        token_path: str = "/oauth/token",  # noqa: S107 - a path, not a password
        jwks_path: str = "/.well-known/jwks.json",
        max_body: int = 8192,
        realm: str = "oauth",
    ) -> None:
        if not isinstance(issuer, TokenIssuer):
            raise ConfigurationError("issuer must be a TokenIssuer")
        for path in (token_path, jwks_path):
            if not path.startswith("/") or len(path) > 200 or not path.isprintable():
                raise ConfigurationError("endpoint paths must be absolute paths")
        if token_path == jwks_path:
            raise ConfigurationError("token_path and jwks_path must differ")
        if not 256 <= max_body <= 65536:
            raise ConfigurationError("max_body must be between 256 and 65536 bytes")
        if not realm.isascii() or not all(c.isalnum() or c in " -_.:" for c in realm):
            raise ConfigurationError("realm must be ASCII letters, digits, spaces or -_.:")
        self.issuer = issuer
        self.keys = keys
        self.clock = clock or SystemClock()
        self.proxies = proxies or TrustedProxies()
        self.token_path = token_path
        self.jwks_path = jwks_path
        self.max_body = max_body
        self.inline = getattr(keys, "in_process", False) is True
        self._flows = KeyFlows(key_format=key_format, hasher=hasher, clock=self.clock)
        self._challenge = (b"www-authenticate", f'Basic realm="{realm}"'.encode())

    @classmethod
    def from_guard(cls, guard: Guard, issuer: TokenIssuer, **options: Any) -> TokenEndpoint:
        """An endpoint on ``guard``'s key store, key format, hasher, proxies and clock."""
        settings: dict[str, Any] = {
            "issuer": issuer,
            "keys": guard.backends.keys,
            "key_format": guard.key_format,
            "hasher": guard.hasher,
            "proxies": guard.proxies,
            "clock": guard.clock,
        }
        settings.update(options)
        return cls(**settings)

    def asgi(self, app: ASGIApp | None = None) -> OAuthASGI:
        """The ASGI face; ``app`` receives every other request."""
        return OAuthASGI(app, endpoint=self)

    def wsgi(self, app: WSGIApp | None = None) -> OAuthWSGI:
        """The WSGI face; ``app`` receives every other request."""
        return OAuthWSGI(self, app)

    # the two drivers

    def handle(self, request: RequestInfo, body: bytes) -> Reply:
        """Answer a request to :attr:`token_path` or :attr:`jwks_path`, blocking."""
        if request.path == self.jwks_path:
            return self._jwks(request)
        try:
            return run_sync(self._token(request, body), self.keys)
        except StorageError:
            return self._unavailable()

    async def ahandle(self, request: RequestInfo, body: bytes) -> Reply:
        """The async :meth:`handle`."""
        if self.inline or request.path == self.jwks_path:
            return self.handle(request, body)
        try:
            return await run_async(self._token(request, body), self.keys)
        except StorageError:
            return self._unavailable()

    # the core

    def _token(self, request: RequestInfo, body: bytes) -> TokenFlow:
        if request.method != "POST":
            return self.error("method_not_allowed", 405, (b"allow", b"POST"))
        try:
            params = parse_form(_one(request, b"content-type"), body)
            auth = client_auth(request.header_values(b"authorization"), params)
        except FormError as exc:
            return self.error(exc.code, exc.status)
        grant = params.get("grant_type")
        if grant is None:
            return self.error("invalid_request")
        if grant != "client_credentials":
            return self.error("unsupported_grant_type")
        try:
            record = yield from self._flows.authenticate(Secret(auth.secret))
        except InvalidCredential:
            return self.error("invalid_client", 401)
        if not hmac.compare_digest(record.id.encode(), auth.client_id.encode()):
            return self.error("invalid_client", 401)
        if record.ip_allow and not self._address_allowed(request, record.ip_allow):
            return self.error("invalid_client", 401)
        try:
            scopes = _requested(params.get("scope"), record.scopes)
            token, expires_in = self.issuer.issue(record, scopes, self.clock.now())
        except InvalidInput:
            return self.error("invalid_scope")
        except InvalidCredential:  # pragma: no cover - authenticate refused it already
            return self.error("invalid_client", 401)
        _logger.info("keyguard issued an access token for key %s", record.id)
        answer: dict[str, Any] = {
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": expires_in,
        }
        if scopes:
            answer["scope"] = " ".join(scopes)
        return _json(200, answer)

    def _jwks(self, request: RequestInfo) -> Reply:
        if request.method not in {"GET", "HEAD"}:
            return self.error("method_not_allowed", 405, (b"allow", b"GET, HEAD"))
        reply = _json(200, self.issuer.jwks())
        headers = tuple(
            (b"cache-control", b"public, max-age=300") if name == b"cache-control" else (name, v)
            for name, v in reply.headers
            if name != b"pragma"
        )
        body = b"" if request.method == "HEAD" else reply.body
        return Reply(200, headers, body)

    def _address_allowed(self, request: RequestInfo, cidrs: tuple[str, ...]) -> bool:
        client = self.proxies.client_ip(request)
        try:
            return IPAllowList.from_cidrs(cidrs).allows(None if client is None else client.ip)
        except ConfigurationError:
            return False

    def error(self, code: str, status: int = 400, *extra: tuple[bytes, bytes]) -> Reply:
        """An RFC 6749 §5.2 error; 401 carries the ``Basic`` challenge."""
        headers = (*extra, self._challenge) if status == 401 else extra
        return _json(status, {"error": code, "error_description": _DESCRIPTIONS[code]}, *headers)

    def _unavailable(self) -> Reply:
        return self.error("temporarily_unavailable", 503, (b"retry-after", b"5"))


def _one(request: RequestInfo, name: bytes) -> bytes | None:
    values = request.header_values(name)
    if len(values) > 1:
        raise FormError("invalid_request")
    return values[0] if values else None


def _requested(scope: str | None, granted: tuple[str, ...]) -> tuple[str, ...]:
    """The scopes asked for, each covered by the key's; all of the key's when omitted."""
    if scope is None:
        return granted
    wanted = scope.split(" ")
    if len(wanted) > MAX_SCOPES:
        raise InvalidInput("scope", "too many scopes")
    scopes = validate_scopes(wanted)
    if not scopes or not all(scope_covers(granted, s) for s in scopes):
        raise InvalidInput("scope", "is not granted to this key")
    return scopes
