"""TokenIssuer: RFC 9068 claims, ES256 signing, rotation with overlap, shared keys."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import timedelta

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
)

from keyguard.errors import ConfigurationError, InvalidCredential, InvalidInput
from keyguard.oauth.claims import InvalidToken
from keyguard.oauth.issuer import TokenIssuer
from keyguard.oauth.keyset import StaticKeys
from keyguard.oauth.validator import JWTValidator
from keyguard.records import KeyRecord
from keyguard.testing import FakeClock, memory_manager

ISSUER = "https://keys.example.com"
API = "https://api.example.com"


def record(clock: FakeClock, scopes: tuple[str, ...] = ("text:generate", "image:*")) -> KeyRecord:
    manager, _ = memory_manager(clock)
    return manager.create("client", scopes=scopes).record


def make(clock: FakeClock, **options: object) -> TokenIssuer:
    return TokenIssuer(issuer=ISSUER, audience=API, clock=clock, **options)  # type: ignore[arg-type]


def test_tokens_carry_the_rfc_9068_claims() -> None:
    """Header typ at+jwt with a kid; iss, sub = client_id = key id, aud, iat, exp, jti, scope."""
    clock = FakeClock()
    issuer = make(clock)
    key = record(clock)
    token, expires_in = issuer.issue(key, ("image:create",), clock.now())
    head = jwt.get_unverified_header(token)
    body = json.loads(
        jwt.api_jws.PyJWS().decode_complete(token, options={"verify_signature": False})["payload"]
    )
    assert (head["alg"], head["typ"], head["kid"]) == (
        "ES256",
        "at+jwt",
        issuer.jwks()["keys"][0]["kid"],
    )
    assert expires_in == 600
    assert (body["iss"], body["aud"]) == (ISSUER, API)
    assert body["sub"] == body["client_id"] == key.id
    assert body["exp"] - body["iat"] == 600
    assert body["scope"] == "image:create"
    assert len(body["jti"]) >= 16
    claims = issuer.validator().validate(token, now=clock.now())
    assert (claims.key_id, claims.client_id, claims.scopes) == (key.id, key.id, ("image:create",))


def test_an_issuer_never_mints_more_than_the_key_holds() -> None:
    """A scope the key lacks, or an inactive key, is refused by the issuer itself."""
    clock = FakeClock()
    issuer = make(clock)
    key = record(clock, ("image:create",))
    with pytest.raises(InvalidInput):
        issuer.issue(key, ("image:*",), clock.now())
    with pytest.raises(InvalidInput):
        issuer.issue(key, ("text:generate",), clock.now())
    revoked = replace(key, revoked_at=clock.datetime())
    with pytest.raises(InvalidCredential):
        issuer.issue(revoked, (), clock.now())


def test_rotation_keeps_the_old_key_published_until_its_tokens_expire() -> None:
    """After rotation old tokens still verify; the old key leaves the JWKS later."""
    clock = FakeClock()
    issuer = make(clock, rotate_every=timedelta(hours=1))
    key = record(clock)
    old_token, _ = issuer.issue(key, (), clock.now())
    old_kid = jwt.get_unverified_header(old_token)["kid"]
    clock.advance(3600)
    new_token, _ = issuer.issue(key, (), clock.now())  # rotates first
    new_kid = jwt.get_unverified_header(new_token)["kid"]
    assert new_kid != old_kid
    assert {k["kid"] for k in issuer.jwks()["keys"]} == {old_kid, new_kid}
    validator = issuer.validator()
    assert validator.validate(new_token, now=clock.now()).key_id == key.id
    clock.advance(601 + 300)  # the old key's last token has expired, plus slack
    assert {k["kid"] for k in issuer.jwks()["keys"]} == {new_kid}
    with pytest.raises(InvalidToken):
        validator.validate(old_token, now=clock.now())


def test_a_shared_signing_key_verifies_across_processes() -> None:
    """Two issuers given one PEM key sign with the same kid and accept each other's tokens."""
    clock = FakeClock()
    private = ec.generate_private_key(ec.SECP256R1())
    pem = private.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    first, second = make(clock, signing_key=pem), make(clock, signing_key=pem.decode())
    assert first.jwks() == second.jwks()
    token, _ = first.issue(record(clock), (), clock.now())
    assert second.validator().validate(token, now=clock.now()).key_id is not None
    remote_view = JWTValidator(
        keys=StaticKeys.from_jwks(first.jwks()), issuer=ISSUER, audience=API, algorithms=("ES256",)
    )
    assert remote_view.validate(token, now=clock.now()).key_id is None  # not bound: not a key


@pytest.mark.parametrize(
    "options",
    [
        {"lifetime": timedelta(seconds=30)},
        {"lifetime": timedelta(hours=2)},
        {"rotate_every": timedelta(minutes=15)},
        {"signing_key": b"not a key"},
        {"signing_key": ec.generate_private_key(ec.SECP384R1())},
        {"issuer": ""},
        {"audience": ()},
    ],
    ids=["short", "long", "rotate-too-often", "junk-key", "p384-key", "no-issuer", "no-aud"],
)
def test_bad_issuer_configuration_is_refused(options: dict[str, object]) -> None:
    """Lifetimes outside 1-60 minutes, rotation shorter than two lifetimes, non-P-256
    signing keys and empty names are configuration errors."""
    settings: dict[str, object] = {"issuer": ISSUER, "audience": API}
    settings.update(options)
    with pytest.raises(ConfigurationError):
        TokenIssuer(**settings)  # type: ignore[arg-type]


def test_explicit_rotation_and_repr() -> None:
    """rotate() returns the new kid; repr shows the kid, never key material."""
    clock = FakeClock()
    issuer = make(clock)
    kid = issuer.rotate()
    assert kid in repr(issuer)
    assert len(issuer.jwks()["keys"]) == 2
    assert all("d" not in k for k in issuer.jwks()["keys"])
