"""OAuth 2.0 access tokens beside API keys: validate them, issue them, introspect them.

Validating (the ``tokens=`` option of :class:`~keyguard.guard.Guard`):

- :class:`JWTValidator` with keys from :class:`RemoteJWKS` (an identity provider's
  JWKS URL), :class:`StaticKeys`, a :class:`SharedSecret` (HS256 only) or keyguard's
  own :class:`TokenIssuer`;
- :class:`IntrospectionValidator` for opaque tokens (RFC 7662).

Issuing (the client-credentials grant, a key as the client): :class:`TokenIssuer`
signs, :class:`TokenEndpoint` answers ``POST /oauth/token`` and serves the JWKS,
mounted with :class:`OAuthASGI` or :class:`OAuthWSGI`.

Everything but :mod:`keyguard.oauth.claims` needs the ``oauth`` extra
(``pip install 'keyguard[oauth]'``: PyJWT ≥ 2.13 with ``cryptography``, and httpx);
the names are imported on first use, so the guard itself never needs them.

.. versionadded:: 0.2
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from .claims import InvalidToken, TokenClaims, TokenUnavailable, TokenValidator

if TYPE_CHECKING:
    from .endpoint import TokenEndpoint
    from .introspection import IntrospectionValidator
    from .issuer import TokenIssuer
    from .jwks import RemoteJWKS
    from .keyset import KeySet, KeySource, SharedSecret, StaticKeys
    from .mount import OAuthASGI, OAuthWSGI
    from .validator import JWTValidator

__all__ = [
    "IntrospectionValidator",
    "InvalidToken",
    "JWTValidator",
    "KeySet",
    "KeySource",
    "OAuthASGI",
    "OAuthWSGI",
    "RemoteJWKS",
    "SharedSecret",
    "StaticKeys",
    "TokenClaims",
    "TokenEndpoint",
    "TokenIssuer",
    "TokenUnavailable",
    "TokenValidator",
]

_LAZY = {
    "IntrospectionValidator": "introspection",
    "JWTValidator": "validator",
    "KeySet": "keyset",
    "KeySource": "keyset",
    "OAuthASGI": "mount",
    "OAuthWSGI": "mount",
    "RemoteJWKS": "jwks",
    "SharedSecret": "keyset",
    "StaticKeys": "keyset",
    "TokenEndpoint": "endpoint",
    "TokenIssuer": "issuer",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'keyguard.oauth' has no attribute {name!r}")
    try:
        return getattr(import_module(f".{module}", __name__), name)
    except ImportError as exc:
        raise ImportError(
            f"keyguard.oauth.{name} needs PyJWT>=2.13 with cryptography, and httpx; "
            "install keyguard[oauth]"
        ) from exc
