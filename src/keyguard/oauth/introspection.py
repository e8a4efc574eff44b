"""Opaque access tokens checked at another authorization server (RFC 7662).

:class:`IntrospectionValidator` POSTs the token (form body, never the URL) to the
introspection endpoint, authenticating as a client with HTTP Basic, and caches
active answers in a bounded LRU keyed by the token's SHA-256, never past the
token's ``exp`` (RFC 7662 §4) nor ``cache_ttl``. ``{"active": false}`` is 401
``invalid_token``; an endpoint that is down, slow or answers junk is 503 with
``Retry-After``. Inactive answers are not cached: a revoked token stays revoked.

**Security note**: caching trades revocation latency for load: a token revoked at
the authorization server keeps working here for up to ``cache_ttl`` (60 s).

.. versionadded:: 0.2
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from ..errors import ConfigurationError, StorageError
from ..flows import Op, run_sync
from ..keys import Secret
from ._http import FetchFailed, HttpSettings, afetch_json, check_url, fetch_json
from .claims import (
    InvalidToken,
    TokenClaims,
    TokenFlow,
    TokenUnavailable,
    parse_scope,
    valid_client_id,
)

__all__ = ["IntrospectionValidator"]

_ACCESS_TYPES = frozenset(
    {"bearer", "access_token", "urn:ietf:params:oauth:token-type:access_token"}
)
_RETRY = 5.0


class IntrospectionValidator:
    """Validates opaque tokens at an RFC 7662 endpoint, for ``Guard(tokens=...)``.

    :param url: the introspection endpoint (https; http only to loopback).
    :param client_id: this resource server's client id at the authorization server.
    :param client_secret: its secret (sent with HTTP Basic, never logged).
    :param issuer: when given, an answer's ``iss`` must equal it.
    :param audience: when given, an answer's ``aud`` must contain it.
    :param cache_ttl: seconds an active answer is reused (60; 0 disables the cache).
    :param max_entries: the cache's bound (10,000 tokens).
    :param timeout: seconds an introspection call may take in all.
    :param max_token_bytes: the longest token sent anywhere.
    :param proxy: an explicit proxy URL; the environment is never read.
    """

    in_process = False

    def __init__(
        self,
        url: str,
        *,
        client_id: str,
        client_secret: str,
        issuer: str | None = None,
        audience: str | None = None,
        cache_ttl: float = 60.0,
        max_entries: int = 10_000,
        timeout: float = 2.0,
        max_token_bytes: int = 4096,
        proxy: str | None = None,
    ) -> None:
        self.url = check_url(url, "introspection URL")
        if not client_id or not client_secret:
            raise ConfigurationError("introspection needs a client_id and a client_secret")
        if not 0 <= cache_ttl <= 3600 or not 1 <= max_entries <= 1_000_000:
            raise ConfigurationError("cache_ttl must be 0-3600 s and max_entries 1-1,000,000")
        if not 16 <= max_token_bytes <= 16384:
            raise ConfigurationError("max_token_bytes must be between 16 and 16384")
        self._auth = (client_id, Secret(client_secret))
        self.issuer = issuer
        self.audience = audience
        self.cache_ttl = float(cache_ttl)
        self._max_bytes = max_token_bytes
        self._http = HttpSettings(timeout=timeout, max_bytes=64 * 1024, proxy=proxy)
        self._cache: OrderedDict[str, tuple[float, TokenClaims]] = OrderedDict()
        self._max_entries = max_entries
        self._lock = threading.Lock()
        self.calls = 0  # introspection requests so far: a figure for metrics and tests

    def __repr__(self) -> str:
        return f"IntrospectionValidator({self.url!r}, client_id={self._auth[0]!r})"

    @property
    def max_token_bytes(self) -> int:
        return self._max_bytes

    def validate(self, token: str, now: float | None = None) -> TokenClaims:
        """Validate with blocking I/O."""
        return run_sync(self.flow(token, time.time() if now is None else now), None)

    def flow(self, token: str, now: float) -> TokenFlow:
        """The validation as a flow: a cache hit, or one introspection call yielded."""
        if not token or len(token) > self._max_bytes:
            raise InvalidToken("oversized")
        digest = hashlib.sha256(token.encode()).hexdigest()
        cached = self._cached(digest, now)
        if cached is not None:
            return cached
        try:
            answer = yield _Introspect(self, Secret(token))
        except StorageError:
            raise TokenUnavailable(_RETRY) from None
        claims = self._claims(answer, now)
        if self.cache_ttl:
            self._remember(digest, claims, min(now + self.cache_ttl, claims.expires_at))
        return claims

    # the call

    def _form(self, token: Secret) -> tuple[dict[str, str], tuple[str, str]]:
        self.calls += 1
        data = {"token": token.reveal(), "token_type_hint": "access_token"}
        return data, (self._auth[0], self._auth[1].reveal())

    def call(self, token: Secret) -> object:
        """POST the token to the endpoint (blocking); the JSON answer.

        :raises StorageError: the endpoint is unreachable, slow or answers junk; the
            message names the failure, never the token.
        """
        data, auth = self._form(token)
        try:
            return fetch_json(self._http, "POST", self.url, data=data, auth=auth)
        except FetchFailed as exc:
            raise StorageError(f"introspection failed: {exc.reason}") from None

    async def acall(self, token: Secret) -> object:
        """The async :meth:`call`."""
        data, auth = self._form(token)
        try:
            return await afetch_json(self._http, "POST", self.url, data=data, auth=auth)
        except FetchFailed as exc:
            raise StorageError(f"introspection failed: {exc.reason}") from None

    # the answer

    def _claims(self, answer: object, now: float) -> TokenClaims:
        if not isinstance(answer, dict):
            raise TokenUnavailable(_RETRY)  # junk from the endpoint: its fault, not the token's
        if answer.get("active") is not True:
            raise InvalidToken("inactive")
        expires = answer.get("exp", now + self.cache_ttl + 1)
        if (
            isinstance(expires, bool)
            or not isinstance(expires, int | float)
            or not math.isfinite(expires)
            or now >= expires
        ):
            raise InvalidToken("expired", forged=False)
        kind = answer.get("token_type")
        if kind is not None and (not isinstance(kind, str) or kind.lower() not in _ACCESS_TYPES):
            raise InvalidToken("token_type", forged=False)
        if self.issuer is not None and answer.get("iss") != self.issuer:
            raise InvalidToken("issuer", forged=False)
        aud = answer.get("aud")
        audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        if self.audience is not None and self.audience not in audiences:
            raise InvalidToken("audience", forged=False)
        client = valid_client_id(answer.get("client_id", answer.get("sub")))
        if client is None:
            raise InvalidToken("client", forged=False)
        scope = answer.get("scope")
        subject, token_id = answer.get("sub"), answer.get("jti")
        return TokenClaims(
            client_id=client,
            scopes=() if scope is None else parse_scope(scope, wildcards=False),
            issuer=str(answer.get("iss", self.url))[:2048],
            expires_at=float(expires),
            subject=subject if isinstance(subject, str) else None,
            token_id=token_id if isinstance(token_id, str) else None,
        )

    # the cache

    def _cached(self, digest: str, now: float) -> TokenClaims | None:
        with self._lock:
            entry = self._cache.get(digest)
            if entry is None:
                return None
            if entry[0] <= now:
                del self._cache[digest]
                return None
            self._cache.move_to_end(digest)
            return entry[1]

    def _remember(self, digest: str, claims: TokenClaims, until: float) -> None:
        with self._lock:
            self._cache[digest] = (until, claims)
            self._cache.move_to_end(digest)
            while len(self._cache) > self._max_entries:
                self._cache.popitem(last=False)


@dataclass(frozen=True, slots=True)
class _Introspect(Op[object, object, object]):
    """The introspection call, yielded to the guard's driver; the token stays masked."""

    validator: IntrospectionValidator
    token: Secret

    def run(self, ctx: object) -> object:
        return self.validator.call(self.token)

    async def arun(self, ctx: object) -> object:
        return await self.validator.acall(self.token)
