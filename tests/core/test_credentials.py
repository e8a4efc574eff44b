"""Credential extraction and stripping on RequestInfo values (SECURITY.md C1, T66, T90)."""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Callable
from urllib.parse import parse_qsl, unquote_to_bytes

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keyguard.credentials import (
    Credential,
    CredentialConfig,
    MalformedCredential,
    extract_credential,
    strip_credential_headers,
    strip_credential_query,
    strip_credentials,
)
from keyguard.errors import ConfigurationError, InvalidCredential
from keyguard.request import RequestInfo

CANARY = "kg_live_" + secrets.token_hex(16)
DEFAULT = CredentialConfig()
WITH_QUERY = CredentialConfig(methods=("header", "bearer", "query"))
QUERY_ONLY = CredentialConfig(methods=("query",))


def request(*headers: tuple[bytes, bytes], query: bytes = b"") -> RequestInfo:
    return RequestInfo("GET", "/v1/chat", headers=(*headers, (b"host", b"api")), query_string=query)


def key(value: bytes) -> tuple[bytes, bytes]:
    return (b"x-api-key", value)


def auth(value: bytes) -> tuple[bytes, bytes]:
    return (b"authorization", value)


def revealed(cred: Credential | None) -> str | None:
    return None if cred is None else cred.value.reveal()


def malformed(req: RequestInfo, config: CredentialConfig = DEFAULT) -> MalformedCredential:
    with pytest.raises(MalformedCredential) as info:
        extract_credential(req, config)
    assert info.value.reason == "malformed_request"
    assert CANARY not in str(info.value)
    return info.value


def invalid_token(req: RequestInfo, config: CredentialConfig = DEFAULT) -> InvalidCredential:
    with pytest.raises(InvalidCredential) as info:
        extract_credential(req, config)
    assert not isinstance(info.value, MalformedCredential)
    assert CANARY not in str(info.value)
    return info.value


def test_t1_no_credential() -> None:
    """A request without any credential yields None (401 with a bare challenge)."""
    assert extract_credential(request(), DEFAULT) is None
    assert extract_credential(RequestInfo("GET", "/"), WITH_QUERY) is None


def test_header_and_bearer_credentials() -> None:
    """Each enabled method yields a Credential naming its method, value masked."""
    by_header = extract_credential(request(key(CANARY.encode())), DEFAULT)
    by_bearer = extract_credential(request(auth(b"Bearer " + CANARY.encode())), DEFAULT)
    by_query = extract_credential(request(query=b"api_key=" + CANARY.encode()), WITH_QUERY)
    assert [c.method for c in (by_header, by_bearer, by_query) if c] == [
        "header",
        "bearer",
        "query",
    ]
    assert {revealed(by_header), revealed(by_bearer), revealed(by_query)} == {CANARY}
    assert CANARY not in repr(by_header)


@pytest.mark.parametrize("value", [b"bearer tok", b"BEARER tok", b"Bearer  tok", b"Bearer tok "])
def test_t2_scheme_case_and_spacing(value: bytes) -> None:
    """The scheme is case-insensitive and 1*SP may be several spaces."""
    assert revealed(extract_credential(request(auth(value)), DEFAULT)) == "tok"


@pytest.mark.parametrize("value", [b"Bearer\ttok", b"Bearer", b"Bearer ", b"Bearer   ", b" Bearer"])
def test_t2_bearer_without_token_is_malformed(value: bytes) -> None:
    """A tab after the scheme, or no token at all, is a 400."""
    assert malformed(request(auth(value))).detail == "bearer_syntax"


@pytest.mark.parametrize("value", [b"Basic dXNlcjpwYXNz", b"Digest a=b", b"BearerX tok", b""])
def test_t2_other_schemes_count_as_no_credential(value: bytes) -> None:
    """An Authorization header with another scheme is the app's, not a credential."""
    assert extract_credential(request(auth(value)), DEFAULT) is None


def test_t2_authorization_is_ignored_when_bearer_is_off() -> None:
    """With only the key header enabled, Authorization belongs to the app."""
    config = CredentialConfig(methods=("header",))
    req = request(key(b"abc"), auth(b"Bearer jwt.for.app"))
    assert revealed(extract_credential(req, config)) == "abc"


@pytest.mark.parametrize(
    "token",
    [b"a b", b"a,b", b'a"b', b"a\\b", "caf\u00e9".encode(), b"a==b", b"=", b"a;b"],
)
def test_t3_token_outside_b64token_grammar(token: bytes) -> None:
    """A bearer token outside the b64token grammar makes the header unparsable: 400."""
    malformed(request(auth(b"Bearer " + token)))


def test_t3_padding_and_full_alphabet_are_accepted() -> None:
    """Trailing '=' padding and every b64token character are valid."""
    token = b"AZaz09-._~+/=="
    assert revealed(extract_credential(request(auth(b"Bearer " + token)), DEFAULT)) == (
        token.decode()
    )


@pytest.mark.parametrize("value", [b'a"b', b"a\\b", b"a b", b"a==b", b"==="])
def test_t3_key_header_that_cannot_be_a_key_is_invalid_token(value: bytes) -> None:
    """An X-API-Key value that is a valid field but no key is a 401, like an unknown key."""
    assert invalid_token(request(key(value))).reason == "malformed"


@pytest.mark.parametrize(
    ("headers", "query"),
    [
        ((key(b"A"), auth(b"Bearer B")), b""),
        ((auth(b"Bearer A"),), b"api_key=B"),
        ((key(b"A"),), b"api_key=B"),
        ((key(b"same"), auth(b"Bearer same")), b""),
    ],
)
def test_t4_two_methods_in_one_request(
    headers: tuple[tuple[bytes, bytes], ...], query: bytes
) -> None:
    """Two methods are refused even when they carry the same value."""
    assert malformed(request(*headers, query=query), WITH_QUERY).detail == "multiple_methods"


def test_t4_empty_second_method_is_not_a_second_credential() -> None:
    """An empty value is missing, so it does not make a request multi-method."""
    assert revealed(extract_credential(request(key(b""), auth(b"Bearer t")), DEFAULT)) == "t"


@pytest.mark.parametrize(
    ("headers", "detail"),
    [
        ((key(b"k1"), key(b"k2")), "duplicate_header"),
        ((key(b"k1"), key(b"k1")), "duplicate_header"),
        ((key(b""), key(b"k1")), "duplicate_header"),
        ((auth(b"Bearer a"), auth(b"Bearer b")), "duplicate_header"),
        ((auth(b"Basic x"), auth(b"Bearer b")), "duplicate_header"),
        ((key(b"k1,k2"),), "comma_joined"),
        ((key(b"k1, k2"),), "comma_joined"),
    ],
)
def test_t5_duplicated_header_lines(headers: tuple[tuple[bytes, bytes], ...], detail: str) -> None:
    """Repeated lines and WSGI comma-joined values are refused, never first- or last-wins."""
    assert malformed(request(*headers)).detail == detail


@pytest.mark.parametrize(
    "query", [b"api_key=a&api_key=b", b"api_key=a&x=1&api_key=a", b"api_key&api_key=b"]
)
def test_t6_duplicated_query_params(query: bytes) -> None:
    """A repeated key parameter is a 400."""
    assert malformed(request(query=query), QUERY_ONLY).detail == "duplicate_query"


def test_t6_array_forms_are_not_the_key_param() -> None:
    """api_key[] and api_key[1] are other parameters, as in Kong's tests."""
    for query in (b"api_key[]=x", b"api_key[1]=x", b"api_key%5B%5D=x", b"xapi_key=x"):
        assert extract_credential(request(query=query), QUERY_ONLY) is None
    assert revealed(extract_credential(request(query=b"api_key[]=x&api_key=y"), QUERY_ONLY)) == "y"


def test_t7_underscore_header_is_not_the_key_header() -> None:
    """An ASGI header x_api_key is not x-api-key."""
    assert extract_credential(request((b"x_api_key", CANARY.encode())), DEFAULT) is None


@pytest.mark.parametrize("name", ["x_api_key", "X-API-Key", "x--key", "-x", "x-", "", "x key"])
def test_t7_header_names_must_be_lower_case_hyphenated(name: str) -> None:
    """Underscores, upper case and malformed names are refused at configuration."""
    with pytest.raises(ConfigurationError, match="header_name"):
        CredentialConfig(header_name=name)


def best_time(call: Callable[[], object], runs: int = 3) -> float:
    timings = []
    for _ in range(runs):
        start = time.perf_counter()
        with contextlib.suppress(InvalidCredential):
            call()
        timings.append(time.perf_counter() - start)
    return min(timings)


@pytest.mark.parametrize("size", [10 * 1024, 1024 * 1024])
def test_t8_oversized_credentials(size: int) -> None:
    """Oversized values are a 401 invalid_token decided by length alone, in microseconds."""
    value = b"A" * size
    for req, config in [
        (request(key(value)), DEFAULT),
        (request(auth(b"Bearer " + value)), DEFAULT),
        (request(auth(b"Bearer " + b" " * size)), DEFAULT),
        (request(query=b"api_key=" + value), QUERY_ONLY),
        (request(query=b"api_key=" + b"%41" * size), QUERY_ONLY),
    ]:
        assert invalid_token(req, config).reason == "oversized"
    assert best_time(lambda: extract_credential(request(key(value)), DEFAULT)) < 0.001


def test_t8_limit_is_inclusive() -> None:
    """A value of exactly max_length is accepted; one byte more is refused."""
    config = CredentialConfig(max_length=64)
    assert extract_credential(request(key(b"A" * 64)), config) is not None
    assert invalid_token(request(key(b"A" * 65)), config).reason == "oversized"
    assert extract_credential(request(auth(b"Bearer " + b"A" * 64)), config) is not None
    assert invalid_token(request(auth(b"Bearer " + b"A" * 65)), config).reason == "oversized"


@pytest.mark.parametrize(
    "bad", [b"\xff\xfe", b"\xc3\x28", b"\x00", b"\r", b"\n", b"\x7f", b"\x01", b"\x1b"]
)
def test_t9_bad_bytes_in_header_values(bad: bytes) -> None:
    """Non-UTF-8 bytes and control characters are a 400, never a decode error."""
    assert malformed(request(key(b"kg" + bad + b"x"))).detail == "bad_bytes"
    assert malformed(request(auth(b"Bearer kg" + bad + b"x"))).detail == "bearer_syntax"


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (b"api_key=abc%2Bdef", "abc+def"),
        (b"api_key=ab%41", "abA"),
        (b"api%5Fkey=abc", "abc"),
        (b"a=1&api_key=x%3D%3D", "x=="),
    ],
)
def test_t11_query_values_are_decoded_exactly_once(query: bytes, expected: str) -> None:
    """Names and values are percent-decoded once, as the framework will decode them."""
    assert revealed(extract_credential(request(query=query), QUERY_ONLY)) == expected


@pytest.mark.parametrize("value", [b"%00abc", b"abc%0d%0a", b"a+b", b"%2541", b"%ff", b"%zz"])
def test_t11_percent_encoding_tricks(value: bytes) -> None:
    """Decoded values outside the token alphabet are a 401 invalid_token, not a 400."""
    assert invalid_token(request(query=b"api_key=" + value), QUERY_ONLY).reason == "malformed"


def test_t12_query_auth_is_off_by_default() -> None:
    """With the default configuration a query key is not a credential at all."""
    assert extract_credential(request(query=b"api_key=" + CANARY.encode()), DEFAULT) is None
    assert strip_credential_query(b"api_key=x", DEFAULT) == b"api_key=x"


def test_t12_strip_query_keeps_order_and_encoding() -> None:
    """Removing the key keeps every other parameter byte for byte, in order."""
    query = b"b=%2F&api_key=" + CANARY.encode() + b"&a=x+y&&c&api_key[]=1&api%5Fkey=2"
    assert strip_credential_query(query, WITH_QUERY) == b"b=%2F&a=x+y&&c&api_key[]=1"
    assert strip_credential_query(b"a=1&b=2", WITH_QUERY) == b"a=1&b=2"
    assert strip_credential_query(b"api_key=x", WITH_QUERY) == b""


@pytest.mark.parametrize(
    ("headers", "query"),
    [
        ((key(b""),), b""),
        ((key(b"   "),), b""),
        ((), b"api_key="),
        ((), b"api_key"),
        ((), b"api_key=&a=1"),
    ],
)
def test_t13_empty_values_count_as_missing(
    headers: tuple[tuple[bytes, bytes], ...], query: bytes
) -> None:
    """An empty header or parameter is no credential (401 without an error code)."""
    assert extract_credential(request(*headers, query=query), WITH_QUERY) is None


def test_t66_strip_credential_headers_returns_a_copy() -> None:
    """The key header and Bearer lines are removed from a copy; other schemes are kept."""
    headers = [(b"host", b"api"), key(CANARY.encode()), auth(b"bearer " + CANARY.encode())]
    stripped = strip_credential_headers(headers, DEFAULT)
    assert stripped == [(b"host", b"api")]
    assert len(headers) == 3
    basic = [auth(b"Basic dXNlcg=="), key(b"x")]
    assert strip_credential_headers(basic, DEFAULT) == [auth(b"Basic dXNlcg==")]
    header_only = CredentialConfig(methods=("header",))
    assert strip_credential_headers([auth(b"Bearer app")], header_only) == [auth(b"Bearer app")]


def test_t66_strip_credentials_on_a_request() -> None:
    """strip_credentials gives new headers and query without the canary, request untouched."""
    req = request(key(CANARY.encode()), query=b"x=1&api_key=" + CANARY.encode())
    headers, query = strip_credentials(req, WITH_QUERY)
    assert CANARY not in repr((headers, query))
    assert headers == [(b"host", b"api")]
    assert query == b"x=1"
    assert req.header_values(b"x-api-key") == [CANARY.encode()]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"methods": ()},
        {"methods": ("header", "header")},
        {"methods": ("cookie",)},
        {"header_name": "authorization"},
        {"query_param": "api key"},
        {"query_param": "api_key[]"},
        {"query_param": ""},
        {"query_param": "a" * 65},
        {"max_length": 8},
        {"max_length": 10**6},
        {"max_length": True},
    ],
)
def test_configuration_is_validated(kwargs: dict[str, object]) -> None:
    """Invalid settings raise ConfigurationError at construction."""
    with pytest.raises(ConfigurationError):
        CredentialConfig(**kwargs)  # type: ignore[arg-type]


def test_methods_given_as_a_list_are_frozen() -> None:
    """A list of methods is stored as a tuple, keeping the config hashable."""
    config = CredentialConfig(methods=["bearer"])  # type: ignore[arg-type]
    assert config.methods == ("bearer",)
    assert hash(config) == hash(CredentialConfig(methods=("bearer",)))


ADVERSARIAL = 100 * 1024


@pytest.mark.parametrize(
    "req",
    [
        request(key(b"A" * ADVERSARIAL)),
        request(key(b"," * ADVERSARIAL)),
        request(auth(b"Bearer " + b"=" * ADVERSARIAL)),
        request(auth(b" " * ADVERSARIAL + b"Bearer x")),
        request(*[key(b"a")] * 2000),
        request(query=b"&" * ADVERSARIAL),
        request(query=b"api_key=" + b"%" * ADVERSARIAL),
        request(query=b"%" * ADVERSARIAL),
        request(query=b"api_key%=1&" * (ADVERSARIAL // 11)),
        request(query=b"api_key=" + b"%41" * 16000),
        request(query=b"&" * ADVERSARIAL + b"api_key=x"),
        request(query=b"api%5fkey%" * (ADVERSARIAL // 10)),
        request(query=b"api%5Fkey=" + b"%4" * 30000),
    ],
)
def test_t90_no_super_linear_parsing(req: RequestInfo) -> None:
    """100 KiB adversarial credentials are refused or parsed in under 10 ms."""
    config = CredentialConfig(methods=("header", "bearer", "query"), max_length=16384)
    assert best_time(lambda: extract_credential(req, config)) < 0.01


NAMES = st.sampled_from([b"x-api-key", b"authorization", b"x_api_key", b"host", b"cookie"])
VALUES = st.one_of(
    st.binary(max_size=80),
    st.builds(lambda t: b"Bearer " + t, st.binary(max_size=40)),
    st.text(alphabet="Bearr bB=,-._~+/\t", max_size=30).map(str.encode),
)


@given(
    headers=st.lists(st.tuples(NAMES, VALUES), max_size=5),
    query=st.one_of(
        st.binary(max_size=60), st.text(alphabet="api_key=%&+2F5B", max_size=40).map(str.encode)
    ),
)
def test_random_requests_never_raise_anything_else(
    headers: list[tuple[bytes, bytes]], query: bytes
) -> None:
    """Any header list and query yield a Credential, None, or an InvalidCredential."""
    req = RequestInfo("GET", "/", headers=tuple(headers), query_string=query)
    try:
        result = extract_credential(req, WITH_QUERY)
    except InvalidCredential:
        return
    assert result is None or isinstance(result, Credential)
    if result is not None:
        assert result.value.reveal().isascii()
        assert result.value.reveal().isprintable()


QUERIES = st.one_of(
    st.binary(max_size=80),
    st.lists(
        st.sampled_from(
            [
                "api_key",
                "api%5Fkey",
                "api%5fkey",
                "api_key=",
                "api_key=x",
                "a=1",
                "",
                "api_key[]=1",
                "%61pi_key=%41",
                "api+key=x",
                "api_key%3Dx",
            ]
        ),
        max_size=5,
    ).map(lambda parts: "&".join(parts).encode()),
)


@given(query=QUERIES)
def test_query_parsing_agrees_with_parse_qsl(query: bytes) -> None:
    """The key parameter is found exactly where Starlette's parse_qsl finds it."""
    values = [
        v for k, v in parse_qsl(query.decode("latin-1"), keep_blank_values=True) if k == "api_key"
    ]
    try:
        result = extract_credential(RequestInfo("GET", "/", query_string=query), QUERY_ONLY)
    except MalformedCredential:
        assert len(values) > 1
        return
    except InvalidCredential:
        assert len(values) == 1
        return
    assert len(values) <= 1
    assert revealed(result) == (values[0] if values and values[0] else None)


@given(query=QUERIES)
def test_stripping_removes_exactly_the_key_parameter(query: bytes) -> None:
    """Stripping equals dropping the key's parts from a split on '&', byte for byte."""
    stripped = strip_credential_query(query, WITH_QUERY)
    names = [unquote_to_bytes(p.partition(b"=")[0].replace(b"+", b" ")) for p in query.split(b"&")]
    kept = [p for p, n in zip(query.split(b"&"), names, strict=True) if n != b"api_key"]
    assert stripped == b"&".join(kept)
    assert extract_credential(RequestInfo("GET", "/", query_string=stripped), QUERY_ONLY) is None
