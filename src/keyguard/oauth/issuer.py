"""keyguard as an authorization server: short-lived ES256 access tokens for keys.

:class:`TokenIssuer` signs RFC 9068 access tokens for a key that authenticated at the
token endpoint (the client-credentials grant). Each token says:

- header ``{"alg": "ES256", "typ": "at+jwt", "kid": ...}``;
- ``iss``, ``aud``, ``iat``, ``exp`` (``lifetime`` later: 10 minutes by default),
  ``jti`` (random), ``scope`` (space-delimited, a subset of the key's scopes);
- ``sub`` and ``client_id``: the **key id**. A guard whose validator comes from
  :meth:`TokenIssuer.validator` maps the token back to that key, so the key and its
  tokens share one set of limits, quotas and usage, and a revoked, expired or
  deleted key stops its tokens at once there.

Signing keys are P-256 keys made with ``cryptography`` and rotated every
``rotate_every`` (a day); a retired key's public half stays in :meth:`jwks` until
the last token it signed has expired. ``kid`` is the RFC 7638 thumbprint, the same in
every process that holds the key.

**Security note**: generated keys live in this process only. With several worker
processes or machines, give every one the same ``signing_key`` (a PEM P-256 private
key from your secret store); otherwise a token from one worker fails on another.

.. versionadded:: 0.2
"""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from jwt.algorithms import ECAlgorithm
from jwt.api_jws import PyJWS
from jwt.utils import base64url_encode

from ..clock import Clock, SystemClock, from_timestamp
from ..errors import ConfigurationError, InvalidCredential, InvalidInput
from ..records import KeyRecord, KeyStatus
from .claims import scope_covers
from .keyset import FixedKeys, KeySet
from .validator import JWTValidator

__all__ = ["DEFAULT_LIFETIME", "TokenIssuer"]

DEFAULT_LIFETIME = timedelta(minutes=10)
_PUBLISH_SLACK = 300.0  # keep a retired key published this much past its last token


@dataclass(frozen=True, slots=True)
class _SigningKey:
    kid: str
    private: ec.EllipticCurvePrivateKey
    jwk: dict[str, Any]
    created: float
    publish_until: float | None = None  # set when retired


class TokenIssuer:
    """Signs access tokens for keys; also the key source of its own validator.

    :param issuer: the ``iss`` of every token, e.g. ``https://api.example.com``.
    :param audience: the ``aud`` of every token (this API's identifier).
    :param lifetime: how long a token lives: 1 to 60 minutes, 10 by default. A token
        outlives nothing but this: keep it short, since a resource server that cannot
        see the key store honours a token until it expires.
    :param rotate_every: make a new signing key this often (``None``: never).
    :param signing_key: a P-256 private key (object or PEM) shared by every process;
        given one, no key is generated or rotated automatically.
    :param clock: the wall clock that stamps ``iat``/``exp`` and schedules rotation.
    """

    in_process = True
    symmetric = False

    def __init__(
        self,
        *,
        issuer: str,
        audience: str | Sequence[str],
        lifetime: timedelta = DEFAULT_LIFETIME,
        rotate_every: timedelta | None = timedelta(days=1),
        signing_key: ec.EllipticCurvePrivateKey | bytes | str | None = None,
        clock: Clock | None = None,
    ) -> None:
        if not isinstance(issuer, str) or not issuer:
            raise ConfigurationError("issuer must be a non-empty string")
        audiences = (audience,) if isinstance(audience, str) else tuple(audience)
        if not audiences or not all(isinstance(a, str) and a for a in audiences):
            raise ConfigurationError("audience must be one or more non-empty strings")
        seconds = lifetime.total_seconds()
        if not 60 <= seconds <= 3600:
            raise ConfigurationError("lifetime must be between 1 and 60 minutes")
        if rotate_every is not None and rotate_every.total_seconds() < 2 * seconds:
            raise ConfigurationError("rotate_every must be at least twice the lifetime")
        self.issuer = issuer
        self.audiences = audiences
        self.lifetime = int(seconds)
        self._clock = clock or SystemClock()
        self._rotate_every = None if signing_key is not None else rotate_every
        self._jws = PyJWS(algorithms=["ES256"])
        self._lock = threading.Lock()
        given = None if signing_key is None else _load_private(signing_key)
        self._current = _signing_key(self._clock.now(), given)
        self._retired: tuple[_SigningKey, ...] = ()
        self._published = FixedKeys(_key_set(self._all()))

    def __repr__(self) -> str:
        return f"TokenIssuer({self.issuer!r}, kid={self._current.kid!r})"

    # issuing

    def issue(self, record: KeyRecord, scopes: Sequence[str], now: float) -> tuple[str, int]:
        """A signed token for ``record`` with ``scopes``, and its lifetime in seconds.

        :raises InvalidCredential: the key is not active at ``now``.
        :raises InvalidInput: a scope the key does not grant (checked again here, so
            no caller can mint more than the key holds).
        """
        if record.status(from_timestamp(now)) is not KeyStatus.ACTIVE:
            raise InvalidCredential("inactive")
        for scope in scopes:
            if not scope_covers(record.scopes, scope):
                raise InvalidInput("scope", "is not granted to this key")
        signing = self._signing_key(now)
        issued = int(now)
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": record.id,
            "client_id": record.id,
            "aud": self.audiences[0] if len(self.audiences) == 1 else list(self.audiences),
            "iat": issued,
            "exp": issued + self.lifetime,
            "jti": secrets.token_urlsafe(16),
        }
        if scopes:
            claims["scope"] = " ".join(scopes)
        payload = json.dumps(claims, separators=(",", ":")).encode()
        headers = {"typ": "at+jwt", "kid": signing.kid}
        token = self._jws.encode(payload, signing.private, algorithm="ES256", headers=headers)
        return token, self.lifetime

    def rotate(self, now: float | None = None) -> str:
        """Make a new signing key now; the old one is published until its tokens expire.

        Returns the new ``kid``.
        """
        at = self._clock.now() if now is None else now
        with self._lock:
            self._rotate(at)
            return self._current.kid

    def _signing_key(self, now: float) -> _SigningKey:
        current, every = self._current, self._rotate_every
        if every is not None and now - current.created >= every.total_seconds():
            with self._lock:
                if self._current is current:  # another thread may have rotated already
                    self._rotate(now)
        return self._current

    def _rotate(self, now: float) -> None:
        old = self._current
        retired = _SigningKey(
            old.kid, old.private, old.jwk, old.created, now + self.lifetime + _PUBLISH_SLACK
        )
        kept = [k for k in self._retired if (k.publish_until or 0) > now]
        self._current = _signing_key(now, None)
        self._retired = (*kept, retired)
        self._published = FixedKeys(_key_set(self._all()))

    def _all(self) -> list[_SigningKey]:
        return [self._current, *self._retired]

    # publishing

    def jwks(self) -> dict[str, Any]:
        """The public JWK Set to serve at ``/.well-known/jwks.json``."""
        now = self._clock.now()
        live = [k for k in self._all() if k.publish_until is None or k.publish_until > now]
        return {"keys": [dict(k.jwk) for k in live]}

    def validator(self, **options: Any) -> JWTValidator:
        """A :class:`~keyguard.oauth.validator.JWTValidator` for these tokens, with keys
        read in process and ``bind_keys=True`` (``options`` override the rest)."""
        settings: dict[str, Any] = {
            "keys": self,
            "issuer": self.issuer,
            "audience": self.audiences,
            "algorithms": ("ES256",),
            "bind_keys": True,
        }
        settings.update(options)
        return JWTValidator(**settings)

    # the KeySource face: keys in process, nothing to fetch

    def keys(self) -> KeySet | None:
        return self._published.keys()

    def needs_refresh(self) -> bool:
        return False

    def may_refresh(self) -> bool:
        return False

    def refresh(self) -> KeySet | None:
        return self.keys()

    async def arefresh(self) -> KeySet | None:
        return self.keys()

    def retry_after(self) -> float:
        return 1.0


def _load_private(key: ec.EllipticCurvePrivateKey | bytes | str) -> ec.EllipticCurvePrivateKey:
    if isinstance(key, str | bytes):
        try:
            loaded = load_pem_private_key(key.encode() if isinstance(key, str) else key, None)
        except (ValueError, TypeError):
            raise ConfigurationError("signing_key is not an unencrypted PEM private key") from None
        key = loaded  # type: ignore[assignment]
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ConfigurationError("signing_key must be an EC P-256 (ES256) private key")
    return key


def _signing_key(now: float, given: ec.EllipticCurvePrivateKey | None) -> _SigningKey:
    private = given if given is not None else ec.generate_private_key(ec.SECP256R1())
    public = dict(ECAlgorithm.to_jwk(private.public_key(), as_dict=True))
    kid = _thumbprint(public)
    return _SigningKey(kid, private, {**public, "kid": kid, "alg": "ES256", "use": "sig"}, now)


def _thumbprint(jwk: dict[str, Any]) -> str:
    """RFC 7638: SHA-256 of the required members, sorted, without whitespace."""
    required = {name: jwk[name] for name in ("crv", "kty", "x", "y")}
    canonical = json.dumps(required, separators=(",", ":"), sort_keys=True).encode()
    return base64url_encode(hashlib.sha256(canonical).digest()).decode()


def _key_set(keys: list[_SigningKey]) -> KeySet:
    return KeySet.from_jwks({"keys": [k.jwk for k in keys]})
