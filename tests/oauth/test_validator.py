"""JWTValidator configuration, key binding and direct use (the catalogue is elsewhere)."""

from __future__ import annotations

import asyncio
import json
import re
from importlib import metadata

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given, settings
from hypothesis import strategies as st
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from keyguard.errors import ConfigurationError
from keyguard.oauth.claims import InvalidToken, parse_scope, scope_covers
from keyguard.oauth.jwks import RemoteJWKS
from keyguard.oauth.keyset import KeySet, SharedSecret, StaticKeys
from keyguard.oauth.validator import JWTValidator
from tests.oauth.support import AUD, ISS, NOW, Keys, b64, claims, forge, header, token

SECRET = b"0123456789abcdef0123456789abcdef-shared"


def pem(public: object) -> bytes:
    assert isinstance(public, rsa.RSAPublicKey | ec.EllipticCurvePublicKey)
    return public.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)


def static(material: Keys, **options: object) -> JWTValidator:
    source = StaticKeys.from_jwks(material.jwks())
    settings: dict[str, object] = {"keys": source, "issuer": ISS, "audience": AUD}
    settings.update(options)
    return JWTValidator(**settings)  # type: ignore[arg-type]


def test_pyjwt_is_pinned_past_the_algorithm_confusion_advisories() -> None:
    """PyJWT >= 2.13 (CVE-2022-29217, CVE-2024-53861, GHSA-752w, CVE-2026-48526)."""
    version = tuple(int(p) for p in re.findall(r"\d+", metadata.version("pyjwt"))[:2])
    assert version >= (2, 13)
    assert tuple(int(p) for p in jwt.__version__.split(".")[:2]) >= (2, 13)


@pytest.mark.parametrize(
    "options",
    [
        {"algorithms": ()},
        {"algorithms": ("none",)},
        {"algorithms": ("RS256", "none")},
        {"algorithms": ("HS256",)},
        {"algorithms": ("RS256", "HS256")},
        {"leeway": 301},
        {"leeway": -1},
        {"issuer": ""},
        {"audience": ()},
        {"audience": ""},
        {"max_token_bytes": 100_000},
        {"client_claims": ()},
        {"keys": "https://idp.example.com/jwks"},
    ],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()),
)
def test_bad_configuration_is_refused_at_construction(
    keys: Keys, options: dict[str, object]
) -> None:
    """A validator that could accept forged tokens is never built."""
    with pytest.raises(ConfigurationError):
        static(keys, **options)


def test_hs256_needs_a_shared_secret_and_then_only_hs() -> None:
    """HS256 works with an explicit secret, and a secret verifies nothing asymmetric."""
    secret = SharedSecret(SECRET, kid="s1")
    validator = JWTValidator(keys=secret, issuer=ISS, audience=AUD, algorithms=("HS256",))
    good = forge(header(alg="HS256", kid="s1"), claims(), SECRET, alg="HS256")
    assert validator.validate(good, now=NOW).client_id == "client-1"
    wrong = forge(header(alg="HS256", kid="s1"), claims(), SECRET + b"x", alg="HS256")
    with pytest.raises(InvalidToken):
        validator.validate(wrong, now=NOW)
    with pytest.raises(ConfigurationError):
        JWTValidator(keys=secret, issuer=ISS, audience=AUD)  # RS256/ES256/EdDSA defaults


@pytest.mark.parametrize("form", ["pem", "der", "ssh", "jwk", "short"])
def test_a_public_key_is_never_accepted_as_a_shared_secret(keys: Keys, form: str) -> None:
    """SharedSecret refuses public-key material and short secrets (RFC 8725 §3.5)."""
    public = keys.rsa.public_key()
    secret = {
        "pem": pem(public),
        "der": public.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo),
        "ssh": public.public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH),
        "jwk": RSAAlgorithm.to_jwk(public).encode(),
        "short": b"too short",
    }[form]
    with pytest.raises(ConfigurationError):
        SharedSecret(secret)


def test_shared_secret_masks_itself() -> None:
    """The secret never shows in a repr."""
    assert "0123" not in repr(SharedSecret(SECRET))


def test_static_pem_keys_verify_and_bind(keys: Keys) -> None:
    """PEM keys are bound to their type's algorithm; another algorithm never meets them."""
    source = StaticKeys.from_pem(pem(keys.ec.public_key()), kid="ec-1")
    validator = JWTValidator(keys=source, issuer=ISS, audience=AUD)
    assert validator.validate(token(keys), now=NOW).scopes == ("read",)
    assert validator.in_process


def test_weak_and_unusable_static_keys_are_refused() -> None:
    """A 1024-bit RSA key, or a JWKS with no usable key, is a configuration error."""
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(ConfigurationError):
        StaticKeys.from_pem(pem(weak.public_key()))
    with pytest.raises(ConfigurationError):
        StaticKeys.from_jwks('{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}')
    with pytest.raises(ConfigurationError):
        StaticKeys.from_pem(b"-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n")


def test_key_set_skips_what_may_not_verify(keys: Keys) -> None:
    """oct keys, private members, use=enc, key_ops without verify, a mismatched alg and
    a non-string kid are skipped; max_keys bounds the set."""
    ec_jwk = ECAlgorithm.to_jwk(keys.ec.public_key(), as_dict=True)
    private = ECAlgorithm.to_jwk(keys.ec, as_dict=True)
    document = {
        "keys": [
            {"kty": "oct", "k": "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0", "kid": "oct"},
            {**private, "kid": "private"},
            {**ec_jwk, "kid": "enc", "use": "enc"},
            {**ec_jwk, "kid": "ops", "key_ops": ["encrypt"]},
            {**ec_jwk, "kid": "mismatch", "alg": "RS256"},
            {**ec_jwk, "kid": 7},
            {**ec_jwk, "kid": "x" * 300},
            "not a key",
            {**ec_jwk, "kid": "good", "key_ops": ["verify"]},
        ]
    }
    found = KeySet.from_jwks(document)
    assert list(found.by_kid) == ["good"]
    assert found.find("good", "ES256") is not None
    assert found.find("good", "RS256") is None
    bounded = KeySet.from_jwks(
        {"keys": [{**ec_jwk, "kid": f"k{i}"} for i in range(10)]}, max_keys=3
    )
    assert len(bounded) == 3
    assert all("d" not in k for k in found.public_jwks()["keys"])


def test_a_token_without_kid_needs_exactly_one_candidate(keys: Keys) -> None:
    """Without ``kid`` a key is used only when it is the one key bound to ``alg``."""
    ec_jwk = ECAlgorithm.to_jwk(keys.ec.public_key(), as_dict=True)
    one = KeySet.from_jwks({"keys": [ec_jwk]})
    two = KeySet.from_jwks({"keys": [{**ec_jwk, "kid": "a"}, {**ec_jwk, "kid": "b"}]})
    assert one.find(None, "ES256") is not None
    assert two.find(None, "ES256") is None


def test_http_jwks_url_only_to_loopback() -> None:
    """A JWKS fetched over plain HTTP could be swapped on the path: https only,
    http to loopback only, and never credentials in the URL."""
    RemoteJWKS("https://idp.example.com/jwks")
    RemoteJWKS("http://127.0.0.1:9/jwks")
    RemoteJWKS("http://[::1]:9/jwks")
    for url in ("http://idp.example.com/jwks", "https://user:pw@idp.example.com/", "ftp://x/"):
        with pytest.raises(ConfigurationError):
            RemoteJWKS(url)
    with pytest.raises(ConfigurationError):
        RemoteJWKS("https://idp.example.com/jwks", cooldown=0.1)
    with pytest.raises(ConfigurationError):
        RemoteJWKS("https://idp.example.com/jwks", max_age=10, cooldown=30)


def test_validate_and_avalidate_agree(keys: Keys) -> None:
    """The sync and async entry points give the same claims."""
    validator = static(keys)
    good = token(keys, scope="read write")
    sync = validator.validate(good, now=NOW)
    assert asyncio.run(validator.avalidate(good, now=NOW)) == sync
    assert sync.scopes == ("read", "write")
    assert sync.key_id is None


def test_scope_parsing_and_covering() -> None:
    """Scopes split on spaces, match exactly, and wildcards cover only what they may."""
    assert parse_scope("read  write", wildcards=False) == ("read", "write")
    assert parse_scope("image:* read", wildcards=False) == ("read",)
    assert parse_scope("image:* read", wildcards=True) == ("image:*", "read")
    assert scope_covers(("image:*",), "image:create")
    assert scope_covers(("image:*",), "image:hd:*")
    assert not scope_covers(("image:create",), "image:*")
    assert not scope_covers(("image:*",), "imagex:create")
    assert scope_covers(("*",), "*")
    assert not scope_covers(("image:*",), "*")
    assert not scope_covers(("read",), "readwrite")


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=10,
)
_MEMBER = st.sampled_from(["kty", "kid", "alg", "use", "key_ops", "crv", "x", "y", "n", "e", "d"])
_NAMES = st.sampled_from(["RSA", "EC", "OKP", "oct", "P-256", "Ed25519", "RS256", "ES256", "sig"])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.dictionaries(_MEMBER, _JSON | _NAMES, max_size=8), max_size=4))
def test_any_jwks_document_loads_without_raising(entries: list[dict[str, object]]) -> None:
    """Whatever an identity provider serves, building the key set never raises."""
    KeySet.from_jwks({"keys": entries})


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(st.sampled_from(["alg", "kid", "typ", "crit", "jku"]), _JSON | _NAMES),
    st.dictionaries(st.text(max_size=8), _JSON, max_size=6),
    st.binary(max_size=80),
)
def test_any_token_is_refused_with_invalid_token_only(
    keys: Keys, head: dict[str, object], body: dict[str, object], signature: bytes
) -> None:
    """Random headers, payloads and signatures: InvalidToken, never another exception."""
    validator = static(keys)
    text = f"{b64(json.dumps(head).encode())}.{b64(json.dumps(body).encode())}.{b64(signature)}"
    with pytest.raises(InvalidToken):
        validator.validate(text, now=NOW)
