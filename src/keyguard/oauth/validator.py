"""JWT access tokens (RFC 9068) checked the way RFC 8725 asks.

:class:`JWTValidator` is configured once and refuses a bad configuration at
construction. Per token, in this order, each step before the next:

1. size (``max_token_bytes``, 8 KiB) and shape: three non-empty base64url segments
   with no padding or whitespace (a five-segment JWE is refused, not decrypted);
2. the header, parsed alone (UTF-8, no duplicate members): ``alg`` must be on the
   configured allow-list (never ``none``, never chosen by the token), no ``crit``,
   no ``b64``, a string ``kid`` of at most 256 characters, and ``typ`` ``at+jwt``
   when required; ``jku``, ``x5u``, ``jwk`` and ``x5c`` are never read;
3. the key, looked up by ``kid`` in the configured :class:`KeySource` only, bound to
   one algorithm that must equal ``alg``;
4. the signature, by PyJWT's verifier for that key's one algorithm;
5. only then the claims: ``iss`` exactly equal, ``aud`` containing ours exactly,
   ``exp`` required, ``nbf`` and ``iat`` not in the future, each with ``leeway``
   (at most 300 s), and in strict mode RFC 9068's ``sub``, ``client_id``, ``iat``
   and ``jti``.

Every refusal is :class:`~keyguard.oauth.claims.InvalidToken` (401 ``invalid_token``);
no message holds token data.

.. versionadded:: 0.2
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from typing import Any

from jwt.api_jwk import PyJWK
from jwt.exceptions import PyJWTError

from ..errors import ConfigurationError
from ..flows import run_async, run_sync
from . import _parse as parse
from .claims import (
    InvalidToken,
    TokenClaims,
    TokenFlow,
    TokenUnavailable,
    parse_scope,
    scope_list,
    valid_client_id,
)
from .keyset import ASYMMETRIC, MAX_KID, SYMMETRIC, KeySource, RefreshKeys

__all__ = ["JWTValidator"]

_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
_MAX_HEADER = 2048


class JWTValidator:
    """Validates JWT access tokens for :class:`~keyguard.guard.Guard` (``tokens=``).

    :param keys: where verification keys come from: ``RemoteJWKS(url)``,
        ``StaticKeys.from_pem(...)``, ``SharedSecret(...)`` or a ``TokenIssuer``.
    :param issuer: the exact ``iss`` expected (no prefix, case or slash tolerance).
    :param audience: the ``aud`` value(s) this API answers to; one must be present.
    :param algorithms: the allow-list. Asymmetric by default (RS256, ES256, EdDSA);
        HS256/384/512 only with a :class:`SharedSecret`, and never mixed with
        asymmetric ones.
    :param leeway: seconds of clock skew allowed on ``exp``, ``nbf``, ``iat`` (≤ 300).
    :param typ: the required ``typ`` header (``at+jwt``, compared as a media type);
        ``None`` for issuers that do not send it (then rely on ``aud``).
    :param strict: require RFC 9068's ``sub``, ``client_id``, ``iat`` and ``jti``.
    :param scope_claim: the space-delimited scope claim.
    :param scope_list_claim: an array-valued scope claim to accept too (``scp``,
        ``permissions``); arrays are refused unless named here.
    :param client_claims: the claims naming the client, first present wins.
    :param max_token_bytes: the longest token read, checked before anything else.
    :param bind_keys: the token's ``sub`` is a keyguard key id (tokens from
        keyguard's own :class:`~keyguard.oauth.issuer.TokenIssuer`): the guard then
        applies that key's record (status, plan, limits, IP allow-list, scopes).

    **Security note**: the token chooses nothing here: not the algorithm (the
    allow-list and the key's own algorithm do), not the key (only ``kid`` is read,
    as a lookup in the configured set), not where keys come from.
    """

    def __init__(
        self,
        *,
        keys: KeySource,
        issuer: str,
        audience: str | Sequence[str],
        algorithms: Sequence[str] = ("RS256", "ES256", "EdDSA"),
        leeway: float = 30.0,
        typ: str | None = "at+jwt",
        strict: bool = True,
        scope_claim: str = "scope",
        scope_list_claim: str | None = None,
        client_claims: Sequence[str] = ("client_id", "azp", "sub"),
        max_token_bytes: int = 8192,
        bind_keys: bool = False,
    ) -> None:
        if not isinstance(keys, KeySource):
            raise ConfigurationError("keys must be a KeySource (RemoteJWKS, StaticKeys, ...)")
        self.algorithms = _algorithms(algorithms, symmetric_keys=keys.symmetric)
        if not isinstance(issuer, str) or not 0 < len(issuer) <= 2048:
            raise ConfigurationError("issuer must be a non-empty string")
        wanted = (audience,) if isinstance(audience, str) else tuple(audience)
        if not wanted or not all(isinstance(a, str) and a for a in wanted):
            raise ConfigurationError("audience must be one or more non-empty strings")
        if isinstance(leeway, bool) or not 0 <= leeway <= 300:
            raise ConfigurationError("leeway must be between 0 and 300 seconds")
        if not 512 <= max_token_bytes <= 16384:
            raise ConfigurationError("max_token_bytes must be between 512 and 16384")
        if not client_claims or not all(isinstance(c, str) and c for c in client_claims):
            raise ConfigurationError("client_claims must name at least one claim")
        self.keys = keys
        self.issuer = issuer
        self.audiences = frozenset(wanted)
        self.leeway = float(leeway)
        self.typ = None if typ is None else parse.media_type(typ)
        self.strict = bool(strict)
        self.scope_claim = scope_claim
        self.scope_list_claim = scope_list_claim
        self.client_claims = tuple(client_claims)
        self._max_bytes = max_token_bytes
        self.bind_keys = bool(bind_keys)

    @property
    def in_process(self) -> bool:
        return self.keys.in_process

    @property
    def max_token_bytes(self) -> int:
        return self._max_bytes

    def validate(self, token: str, now: float | None = None) -> TokenClaims:
        """Validate with blocking I/O (a JWKS fetch, when one is due)."""
        return run_sync(self.flow(token, time.time() if now is None else now), None)

    async def avalidate(self, token: str, now: float | None = None) -> TokenClaims:
        """Validate without blocking the event loop."""
        return await run_async(self.flow(token, time.time() if now is None else now), None)

    def flow(self, token: str, now: float) -> TokenFlow:
        """The validation as a flow; it yields only when keys must be fetched."""
        alg, kid = self._header(token)
        source = self.keys
        keys = source.keys()
        if keys is None or source.needs_refresh():
            keys = yield RefreshKeys(source)
        if keys is None:
            raise TokenUnavailable(source.retry_after())
        key = keys.find(kid, alg)
        if key is None and not keys.knows(kid) and source.may_refresh():
            keys = (yield RefreshKeys(source)) or keys
            key = keys.find(kid, alg)
        if key is None:
            raise InvalidToken("unknown_key")
        return self._claims(self._verify(token, key), now)

    # the steps

    def _header(self, token: str) -> tuple[str, str | None]:
        if len(token) > self._max_bytes:
            raise InvalidToken("oversized")
        if not _SHAPE.fullmatch(token):
            raise InvalidToken("malformed")
        encoded = token[: token.index(".")]
        if len(encoded) > _MAX_HEADER:
            raise InvalidToken("malformed")
        header = parse.json_object(parse.b64(encoded), forged=True)
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            raise InvalidToken("algorithm")
        if "crit" in header or "b64" in header:
            raise InvalidToken("crit")
        kid = header.get("kid")
        if kid is not None and (not isinstance(kid, str) or not 0 < len(kid) <= MAX_KID):
            raise InvalidToken("kid")
        if self.typ is not None:
            typ = header.get("typ")
            if not isinstance(typ, str) or parse.media_type(typ) != self.typ:
                raise InvalidToken("typ")
        return alg, kid

    def _verify(self, token: str, key: PyJWK) -> dict[str, Any]:
        """The payload, once ``key``'s own algorithm has verified the signature.

        PyJWT's algorithm object does the cryptography; the checks ``PyJWS`` makes
        before it (``alg`` on the allow-list and equal to the key's one algorithm, a
        string ``kid``, no ``crit``/``b64``, the minimum key length) are made above
        and in :class:`KeySet`, more strictly (no padding, canonical base64). Calling
        ``PyJWS.decode_complete`` instead would re-parse the header and check the
        base64 alphabet character by character: a fifth of the time per token.
        """
        signing_input, _, encoded_signature = token.rpartition(".")
        payload = parse.b64(signing_input[signing_input.index(".") + 1 :])
        signature = parse.b64(encoded_signature)
        algorithm = key.Algorithm
        try:
            prepared = algorithm.prepare_key(key.key)
            weak = algorithm.check_key_length(prepared) is not None
            valid = not weak and algorithm.verify(signing_input.encode(), prepared, signature)
        except (PyJWTError, ValueError, TypeError):
            valid = False
        if not valid:
            raise InvalidToken("signature")
        return parse.json_object(payload, forged=False)

    def _claims(self, claims: dict[str, Any], now: float) -> TokenClaims:
        leeway = self.leeway
        if claims.get("iss") != self.issuer:
            raise InvalidToken("issuer", forged=False)
        if not self.audiences & parse.audiences(claims.get("aud")):
            raise InvalidToken("audience", forged=False)
        expires = parse.date(claims.get("exp"))
        if expires is None or now >= expires + leeway:
            raise InvalidToken("expired", forged=False)
        not_before = parse.date(claims.get("nbf"), optional=True)
        if not_before is not None and not_before > now + leeway:
            raise InvalidToken("not_yet_valid", forged=False)
        issued = parse.date(claims.get("iat"), optional=not self.strict)
        if issued is not None and issued > now + leeway:
            raise InvalidToken("issued_in_future", forged=False)
        subject, token_id = parse.text(claims.get("sub")), parse.text(claims.get("jti"))
        if self.strict and (subject is None or token_id is None or "client_id" not in claims):
            raise InvalidToken("missing_claim", forged=False)
        client = next((claims[c] for c in self.client_claims if c in claims), None)
        client_id = valid_client_id(client)
        if client_id is None or (self.bind_keys and subject is None):
            raise InvalidToken("client", forged=False)
        return TokenClaims(
            client_id=client_id,
            scopes=self._scopes(claims),
            issuer=self.issuer,
            expires_at=expires,
            subject=subject,
            token_id=token_id,
            key_id=subject if self.bind_keys else None,
        )

    def _scopes(self, claims: dict[str, Any]) -> tuple[str, ...]:
        wildcards = self.bind_keys  # only keyguard's own tokens carry keyguard wildcards
        scopes: tuple[str, ...] = ()
        if self.scope_claim in claims:
            scopes = parse_scope(claims[self.scope_claim], wildcards=wildcards)
        listed = claims.get(self.scope_list_claim) if self.scope_list_claim else None
        if listed is not None:
            if not isinstance(listed, list):
                raise InvalidToken("scope", forged=False)
            scopes = scope_list([*scopes, *listed], wildcards=wildcards)
        return scopes


def _algorithms(algorithms: Sequence[str], *, symmetric_keys: bool) -> frozenset[str]:
    chosen = frozenset(algorithms)
    if not chosen or not chosen <= ASYMMETRIC | SYMMETRIC:
        raise ConfigurationError(
            f"algorithms must be among {sorted(ASYMMETRIC | SYMMETRIC)} ('none' never is)"
        )
    if chosen & SYMMETRIC and not (chosen <= SYMMETRIC and symmetric_keys):
        raise ConfigurationError(
            "HS256/384/512 need a SharedSecret key source and no asymmetric algorithm"
        )
    if symmetric_keys and not chosen <= SYMMETRIC:
        raise ConfigurationError("a SharedSecret verifies HS256/384/512 only")
    return chosen
