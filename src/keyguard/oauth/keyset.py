"""Verification keys: each bound to exactly one algorithm, found only by ``kid``.

A :class:`KeySet` is built from a JWK Set document (RFC 7517) or from PEM keys. Every
key is bound, once, to one algorithm: its ``alg`` member, or the single algorithm its
key type allows (RSA → RS256, EC P-256 → ES256, Ed25519 → EdDSA). A token whose
header names another algorithm never meets that key (RFC 8725 §3.1: "Each key MUST
be used with exactly one algorithm"), which is what defeats RS256 → HS256 confusion
and PS256-against-an-RS256-key tricks.

Where keys come from is a :class:`KeySource`: fixed (:class:`StaticKeys`,
:class:`SharedSecret`, keyguard's own :class:`~keyguard.oauth.issuer.TokenIssuer`) or
fetched (:class:`~keyguard.oauth.jwks.RemoteJWKS`). A source is never chosen by the
token: ``jku``, ``x5u``, ``jwk`` and ``x5c`` headers are not read at all.

.. versionadded:: 0.2
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol, runtime_checkable

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt.algorithms import ECAlgorithm, HMACAlgorithm, OKPAlgorithm, RSAAlgorithm
from jwt.api_jwk import PyJWK
from jwt.exceptions import PyJWTError
from jwt.utils import base64url_encode

from ..errors import ConfigurationError
from ..flows import Op

__all__ = [
    "ASYMMETRIC",
    "SYMMETRIC",
    "FixedKeys",
    "KeySet",
    "KeySource",
    "RefreshKeys",
    "SharedSecret",
    "StaticKeys",
]

ASYMMETRIC: Final = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
SYMMETRIC: Final = frozenset({"HS256", "HS384", "HS512"})
MAX_KID = 256
MIN_RSA_BITS = 2048
_KTY_ALGS: Final = {
    "RSA": {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"},
    "EC": {"ES256", "ES384", "ES512"},
    "OKP": {"EdDSA"},
}
_EC_DEFAULT: Final = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}
_PRIVATE: Final = frozenset({"d", "p", "q", "dp", "dq", "qi", "k", "oth"})


@dataclass(frozen=True, slots=True)
class KeySet:
    """Keys by ``kid``; each entry is a key bound to its one algorithm."""

    by_kid: Mapping[str | None, tuple[PyJWK, ...]]

    def find(self, kid: str | None, alg: str) -> PyJWK | None:
        """The key for ``kid`` bound to ``alg``; without ``kid``, the only key bound to
        ``alg`` (several candidates are ambiguous and match nothing)."""
        if kid is not None:
            candidates = self.by_kid.get(kid, ())
        else:
            candidates = tuple(k for keys in self.by_kid.values() for k in keys)
        found = [k for k in candidates if k.algorithm_name == alg]
        return found[0] if len(found) == 1 else None

    def knows(self, kid: str | None) -> bool:
        """Whether ``kid`` names a key here; an unknown one may justify a refetch."""
        return kid is None or kid in self.by_kid

    def __len__(self) -> int:
        return sum(len(keys) for keys in self.by_kid.values())

    def public_jwks(self) -> dict[str, Any]:
        """The set as a JWKS document (public members only)."""
        keys = []
        for kid, bound in self.by_kid.items():
            for key in bound:
                jwk = dict(key.Algorithm.to_jwk(key.key, as_dict=True))
                jwk.update({"alg": key.algorithm_name, "use": "sig"})
                if kid is not None:
                    jwk["kid"] = kid
                keys.append({k: v for k, v in jwk.items() if k not in _PRIVATE})
        return {"keys": keys}

    @classmethod
    def from_jwks(cls, document: object, *, max_keys: int = 50) -> KeySet:
        """The usable signing keys of a JWKS document; others are skipped.

        Skipped: symmetric (``oct``) keys, keys with private members, ``use`` other
        than ``sig``, ``key_ops`` without ``verify``, an ``alg`` that does not fit the
        key type, RSA under 2048 bits, a non-string or over-long ``kid``. At most
        ``max_keys`` are kept, which bounds the kid cache.
        """
        entries = document.get("keys") if isinstance(document, Mapping) else None
        bound: dict[str | None, tuple[PyJWK, ...]] = {}
        for entry in entries if isinstance(entries, list) else ():
            if sum(map(len, bound.values())) >= max_keys:
                break
            found = _bind(entry)
            if found is not None:
                kid, key = found
                bound[kid] = (*bound.get(kid, ()), key)
        return cls(bound)


def _bind(entry: object) -> tuple[str | None, PyJWK] | None:
    """One JWK bound to its single algorithm, or ``None`` when it may not verify."""
    if not isinstance(entry, dict) or _PRIVATE & entry.keys():
        return None
    kty, kid, alg = entry.get("kty"), entry.get("kid"), entry.get("alg")
    if not isinstance(kty, str) or kty not in _KTY_ALGS:
        return None
    if entry.get("use", "sig") != "sig":
        return None
    ops = entry.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        return None
    if kid is not None and (not isinstance(kid, str) or not 0 < len(kid) <= MAX_KID):
        return None
    if alg is None:
        alg = _default_alg(kty, entry.get("crv"))
    if not isinstance(alg, str) or alg not in _KTY_ALGS[kty]:
        return None
    try:
        key = PyJWK(entry, algorithm=alg)
    except (PyJWTError, ValueError, TypeError):
        return None
    if isinstance(key.key, rsa.RSAPublicKey) and key.key.key_size < MIN_RSA_BITS:
        return None
    return kid, key


def _default_alg(kty: str, crv: object) -> str | None:
    if kty == "RSA":
        return "RS256"
    if kty == "EC":
        return _EC_DEFAULT.get(crv) if isinstance(crv, str) else None
    return "EdDSA" if crv == "Ed25519" else None


@runtime_checkable
class KeySource(Protocol):
    """Where a validator's keys come from.

    ``keys()`` is the usable set now (``None``: nothing usable, answer 503);
    ``needs_refresh()`` says a scheduled fetch is due; ``may_refresh()`` says an
    unknown ``kid`` may trigger one now (the cooldown has passed); ``refresh`` and
    ``arefresh`` fetch (coalesced) and return the set then in use.
    """

    @property
    def in_process(self) -> bool: ...

    @property
    def symmetric(self) -> bool: ...

    def keys(self) -> KeySet | None: ...

    def needs_refresh(self) -> bool: ...

    def may_refresh(self) -> bool: ...

    def refresh(self) -> KeySet | None: ...

    async def arefresh(self) -> KeySet | None: ...

    def retry_after(self) -> float: ...


@dataclass(frozen=True, slots=True)
class RefreshKeys(Op[object, object, "KeySet | None"]):
    """The one I/O of JWT validation, yielded to the guard's driver: sync or async."""

    source: KeySource

    def run(self, ctx: object) -> KeySet | None:
        return self.source.refresh()

    async def arun(self, ctx: object) -> KeySet | None:
        return await self.source.arefresh()


class FixedKeys:
    """A key source that never changes and never fetches."""

    in_process = True
    symmetric = False

    def __init__(self, keys: KeySet) -> None:
        if not len(keys):
            raise ConfigurationError("the key set holds no usable signing key")
        self._keys = keys

    def keys(self) -> KeySet | None:
        return self._keys

    def needs_refresh(self) -> bool:
        return False

    def may_refresh(self) -> bool:
        return False

    def refresh(self) -> KeySet | None:
        return self._keys

    async def arefresh(self) -> KeySet | None:
        return self._keys

    def retry_after(self) -> float:
        return 1.0


class StaticKeys(FixedKeys):
    """Public keys given in configuration: a JWKS document or PEM keys.

    ``StaticKeys.from_jwks({"keys": [...]})`` or ``StaticKeys.from_pem(pem, kid="k1")``.
    """

    @classmethod
    def from_jwks(cls, document: Mapping[str, Any] | str) -> StaticKeys:
        data = json.loads(document) if isinstance(document, str) else document
        return cls(KeySet.from_jwks(data))

    @classmethod
    def from_pem(
        cls, *pems: bytes | str, kid: str | None = None, algorithm: str | None = None
    ) -> StaticKeys:
        """One key per PEM public key; ``kid`` only when there is one key."""
        if kid is not None and len(pems) != 1:
            raise ConfigurationError("give a kid only with a single PEM key")
        return cls(KeySet.from_jwks({"keys": [_pem_jwk(p, kid, algorithm) for p in pems]}))


def _pem_jwk(pem: bytes | str, kid: str | None, algorithm: str | None) -> dict[str, Any]:
    try:
        key = load_pem_public_key(pem.encode() if isinstance(pem, str) else pem)
    except ValueError:
        raise ConfigurationError("a static key is not a PEM public key") from None
    jwk: dict[str, Any]
    if isinstance(key, rsa.RSAPublicKey):
        jwk = dict(RSAAlgorithm.to_jwk(key, as_dict=True))
    elif isinstance(key, ec.EllipticCurvePublicKey):
        jwk = dict(ECAlgorithm.to_jwk(key, as_dict=True))
    elif isinstance(key, ed25519.Ed25519PublicKey):
        jwk = dict(OKPAlgorithm.to_jwk(key, as_dict=True))
    else:
        raise ConfigurationError("static keys must be RSA, EC or Ed25519 public keys")
    if kid is not None:
        jwk["kid"] = kid
    if algorithm is not None:
        jwk["alg"] = algorithm
    if _bind(jwk) is None:
        raise ConfigurationError("a static key does not fit its algorithm (or is too short)")
    return jwk


class SharedSecret(FixedKeys):
    """An HMAC secret shared with the issuer: the only way HS256 is ever accepted.

    **Security note**: anyone holding the secret can mint tokens. The secret must be
    random and at least as long as the hash (32 bytes for HS256; RFC 8725 §3.5, RFC
    7518 §3.2), and is refused when it looks like a public key (PEM, DER, SSH or JWK
    text): using a published key as an HMAC secret is the algorithm-confusion attack
    itself.
    """

    symmetric = True

    def __init__(
        self,
        secret: bytes | str,
        *,
        kid: str | None = None,
        algorithm: Literal["HS256", "HS384", "HS512"] = "HS256",
    ) -> None:
        raw = secret.encode() if isinstance(secret, str) else bytes(secret)
        if algorithm not in SYMMETRIC:
            raise ConfigurationError("a shared secret signs with HS256, HS384 or HS512")
        least = {"HS256": 32, "HS384": 48, "HS512": 64}[algorithm]  # RFC 7518 §3.2
        if len(raw) < least:
            raise ConfigurationError(f"a shared secret for {algorithm} needs {least}+ bytes")
        try:
            HMACAlgorithm(HMACAlgorithm.SHA256).prepare_key(raw)
        except PyJWTError:
            raise ConfigurationError("a shared secret must not be a public key") from None
        jwk = {"kty": "oct", "k": base64url_encode(raw).decode(), "alg": algorithm}
        if kid is not None:
            jwk["kid"] = kid
        super().__init__(KeySet({kid: (PyJWK(jwk, algorithm=algorithm),)}))

    def __repr__(self) -> str:
        return "SharedSecret('**********')"
