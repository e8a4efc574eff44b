"""SECURITY.md C1 (T1-T14) end to end: credentials through the raw ASGI and WSGI middleware."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from keyguard.backends.memory import MemoryKeyStore
from keyguard.credentials import CredentialConfig
from keyguard.errors import ConfigurationError
from keyguard.guard import Guard
from keyguard.scopes import RouteRule
from tests.adapters.security_support import (
    Env,
    Front,
    Reply,
    asgi_call,
    canary,
    http_scope,
    well_formed,
)

WITH_QUERY = CredentialConfig(methods=("header", "bearer", "query"))
BARE_CHALLENGE = 'Bearer realm="api", ApiKey realm="api"'
# RFC 6750 §3: error_description is %x20-21 / %x23-5B / %x5D-7E.
DESCRIPTION = re.compile(r'error_description="([\x20\x21\x23-\x5b\x5d-\x7e]*)"')


@pytest.fixture
def memory(tmp_path: Path) -> Iterator[Env]:
    """The memory backends only, for checks that end before any store is asked."""
    environment = Env("memory", tmp_path)
    yield environment
    environment.close()


def missing(reply: Reply) -> bool:
    """401 as for no credential at all: a challenge without an error code."""
    return reply.status == 401 and reply.get("www-authenticate") == BARE_CHALLENGE


def invalid_token(reply: Reply) -> bool:
    return reply.status == 401 and reply.error()["code"] == "invalid_api_key"


def invalid_request(reply: Reply) -> bool:
    challenge = reply.get("www-authenticate") or ""
    return reply.status == 400 and 'error="invalid_request"' in challenge


def test_t1_no_credential_gets_a_bare_challenge(env: Env, front: Front) -> None:
    """No credential: 401 with a challenge carrying no error, a generic body and no-store."""
    reply = front.request(path="/orders")
    assert missing(reply)
    assert reply.get("cache-control") == "no-store"
    assert reply.error() == {
        "code": "missing_api_key",
        "message": "An API key is required for this request.",
        "type": "authentication_error",
    }
    assert env.app.calls == 0


SCHEMES = [
    (b"bearer %s", 200),
    (b"BEARER %s", 200),
    (b"Bearer  %s", 200),
    (b"Bearer\t%s", 400),
    (b"Bearer", 400),
    (b"Bearer ", 400),
    (b"Basic %s", 401),
]


def test_t2_scheme_case_and_spacing(env: Env, front: Front) -> None:
    """The scheme is case-insensitive and takes 1*SP; a tab or no token is 400, Basic is none."""
    key = env.issue().key.encode()
    for template, expected in SCHEMES:
        value = template % key if b"%s" in template else template
        reply = front.raw(headers=[(b"authorization", value)])
        assert reply.status == expected, template
        assert {200: True, 400: invalid_request(reply), 401: missing(reply)}[expected], template


MANGLED: list[tuple[bytes, Callable[[bytes], bytes], int]] = [
    (b"authorization", lambda k: k[:12] + b" " + k[12:], 400),
    (b"authorization", lambda k: k[:12] + b"," + k[12:], 400),
    (b"authorization", lambda k: b'"' + k + b'"', 400),
    (b"authorization", lambda k: k + b"\\", 400),
    (b"authorization", lambda k: k + "é".encode(), 400),
    (b"authorization", lambda k: k[:12] + b"==" + k[12:], 400),
    (b"x-api-key", lambda k: k[:12] + b" " + k[12:], 401),
    (b"x-api-key", lambda k: k[:12] + b"," + k[12:], 400),
    (b"x-api-key", lambda k: b'"' + k + b'"', 401),
    (b"x-api-key", lambda k: k + b"\\", 401),
    (b"x-api-key", lambda k: k + "é".encode(), 400),
    (b"x-api-key", lambda k: k[:12] + b"==" + k[12:], 401),
]


def test_t3_token_outside_the_grammar(memory: Env, face: str) -> None:
    """A header that does not parse is 400 invalid_request; one that parses but is no key is 401."""
    front = memory.front(face)
    for n, (header, mangle, expected) in enumerate(MANGLED):
        key = mangle(memory.issue().key.encode())
        value = b"Bearer " + key if header == b"authorization" else key
        reply = front.raw(headers=[(header, value)])
        assert invalid_request(reply) if expected == 400 else invalid_token(reply), n
    assert memory.app.calls == 0


@pytest.mark.parametrize("same", [False, True])
def test_t4_two_methods_in_one_request(env: Env, face: str, same: bool) -> None:
    """Header plus bearer, or bearer plus query, is 400 even when both carry the same key."""
    config = CredentialConfig(methods=("header", "bearer", "query"), query_param="access_token")
    front = env.front(face, env.guard(credentials=config))
    a, b = env.issue().key, env.issue().key
    second = a if same else b
    both_headers = front.request(headers=[("x-api-key", a), ("authorization", f"Bearer {second}")])
    bearer_and_query = front.request(
        headers=[("authorization", f"Bearer {a}")], query=f"access_token={second}"
    )
    assert invalid_request(both_headers)
    assert invalid_request(bearer_and_query)
    assert env.app.calls == 0
    assert env.limiter.hits == 0


def test_t5_duplicated_header_lines(memory: Env, face: str) -> None:
    """Two credential lines (comma-joined by a WSGI server) are 400, never first- or last-wins."""
    front = memory.front(face)
    a, b = memory.issue().key.encode(), memory.issue().key.encode()
    for header, scheme in ((b"x-api-key", b""), (b"authorization", b"Bearer ")):
        for second in (a, b):
            lines = [(header, scheme + a), (header, scheme + second)]
            assert invalid_request(front.raw(headers=lines)), (header, second == a)
    assert memory.app.calls == 0


def test_t5_comma_joined_wsgi_environ(memory: Env) -> None:
    """``HTTP_X_API_KEY="k1,k2"``, how servers join repeated lines, is 400."""
    front = memory.front("wsgi")
    a, b = memory.issue().key, memory.issue().key
    assert invalid_request(front.raw(headers=[(b"x-api-key", f"{a},{b}".encode())]))


def test_t6_duplicated_or_array_query_parameters(memory: Env, face: str) -> None:
    """A repeated key parameter is 400; bracket forms are not the key parameter at all."""
    front = memory.front(face, memory.guard(credentials=WITH_QUERY))
    a, b = memory.issue().key.encode(), memory.issue().key.encode()
    assert invalid_request(front.raw(query=b"api_key=" + a + b"&api_key=" + b))
    for form in (b"api_key[]=%s", b"api_key[1]=%s", b"api_key%%5B%%5D=%s"):
        assert missing(front.raw(query=form % a)), form
    assert memory.app.calls == 0


def test_t7_underscore_header_is_not_the_key_header(memory: Env) -> None:
    """ASGI ``x_api_key`` is another header: the request has no credential."""
    front = memory.front("asgi")
    assert missing(front.raw(headers=[(b"x_api_key", memory.issue().key.encode())]))


def test_t8_oversized_credentials(env: Env, front: Front) -> None:
    """A huge credential is 401 invalid_token before any store lookup."""
    for header, scheme, size in (
        (b"x-api-key", b"", 10 * 1024),
        (b"x-api-key", b"", 1024 * 1024),
        (b"authorization", b"Bearer ", 64 * 1024),
    ):
        reply = front.raw(headers=[(header, scheme + b"A" * size)])
        assert invalid_token(reply), (header, size)
        assert len(reply.body) < 200
    assert env.keys.finds == 0


BAD_BYTES = [b"\xff\xfe", b"\xc3\x28", b"ab\x00cd", b"ab\rcd", b"ab\ncd", b"ab\x7fcd", b"ab\x01cd"]


def test_t9_bad_bytes_in_header_values(memory: Env, face: str) -> None:
    """Non-UTF-8 and control bytes are 400, never a 500, and never echoed."""
    front = memory.front(face)
    marker = canary().encode()
    for header, scheme in ((b"x-api-key", b""), (b"authorization", b"Bearer ")):
        for value in BAD_BYTES:
            reply = front.raw(headers=[(header, scheme + marker + value + marker)])
            assert invalid_request(reply), (header, value)
            assert marker not in reply.body
            assert value not in reply.body
    assert front.errors == []


@pytest.mark.parametrize(
    "realm", ['api"', "api\\", "api\r\nSet-Cookie: x", "ápi", "api\x00", "", "a" * 65]
)
def test_t10_header_breaking_realm_is_refused_at_startup(realm: str) -> None:
    """A realm that could break or forge a header is a configuration error."""
    with pytest.raises(ConfigurationError):
        Guard(keys=MemoryKeyStore(), realm=realm)


@pytest.mark.parametrize("scope", ['orders:write"', "orders:write\r\n", "orders\\write"])
def test_t10_header_breaking_scope_is_refused_at_startup(scope: str) -> None:
    """A route scope that would be echoed into a challenge must be a plain scope."""
    with pytest.raises(ConfigurationError):
        RouteRule("GET", "/orders", scope)


def test_t10_error_description_is_fixed_and_safe(env: Env, front: Front) -> None:
    """error_description is one fixed phrase in the RFC 6750 alphabet, never request data."""
    marker = canary()
    crafted = [f'{marker}" error="x', f"{marker}\\", well_formed(marker)]
    for value in crafted:
        challenge = front.request(headers=[("x-api-key", value)]).get("www-authenticate") or ""
        assert DESCRIPTION.findall(challenge) == ["invalid or expired credential"]
        assert marker not in challenge
    custom = env.front(front.face, env.guard(realm="orders api:v1"))
    assert custom.request().get("www-authenticate") == (
        'Bearer realm="orders api:v1", ApiKey realm="orders api:v1"'
    )


def test_t11_percent_encoding_tricks(memory: Env, face: str) -> None:
    """Query keys are decoded exactly once and then validated: junk is 401 invalid_token."""
    front = memory.front(face, memory.guard(credentials=WITH_QUERY))
    for value in (b"%00abc", b"abc%0d%0a", b"a+b", b"%2541", b"%25%34%31"):
        assert invalid_token(front.raw(query=b"api_key=" + value)), value


def test_t11_decoded_exactly_once(env: Env, face: str) -> None:
    """A key encoded once authenticates; the same key encoded twice does not."""
    front = env.front(face, env.guard(credentials=WITH_QUERY))
    key = env.issue().key
    once = "".join(f"%{ord(c):02X}" for c in key)
    twice = once.replace("%", "%25")
    assert front.raw(query=f"api_key={once}".encode()).status == 200
    assert invalid_token(front.raw(query=f"api_key={twice}".encode()))


def test_t12_query_auth_is_off_by_default(env: Env, front: Front) -> None:
    """With the default configuration a key in the URL is no credential at all."""
    key = env.issue().key
    assert missing(front.request(query=f"api_key={key}"))
    assert missing(front.request(query=f"access_token={key}"))
    assert env.keys.finds == 0


@pytest.mark.parametrize("vary", [True, False])
def test_t12_query_auth_success_is_private(env: Env, face: str, vary: bool) -> None:
    """A 2xx to a key sent in the URL carries Cache-Control: private (RFC 6750 §2.3)."""
    front = env.front(face, env.guard(credentials=WITH_QUERY), vary=vary)
    reply = front.request(query=f"api_key={env.issue().key}")
    assert reply.status == 200
    assert reply.values("cache-control") == ["private"]
    header = front.request(headers=[("x-api-key", env.issue().key)])
    assert header.status == 200
    assert header.get("cache-control") is None


def test_t12_key_removed_from_a_copy_of_the_asgi_scope(env: Env) -> None:
    """hide_credentials strips the key from a copy; the server's scope is left untouched."""
    front = env.front("asgi", env.guard(credentials=WITH_QUERY), hide_credentials=True)
    key = env.issue().key
    query = f"a=1&api_key={key}&b=%20x+y&a=2&c".encode()
    scope = http_scope(query=query)
    original = {**scope, "headers": list(scope["headers"])}
    reply = env.run(asgi_call(front.asgi, scope))
    assert reply.status == 200
    assert scope == original
    downstream = env.app.seen[-1]
    assert downstream is not scope
    assert downstream["query_string"] == b"a=1&b=%20x+y&a=2&c"


def test_t12_key_removed_from_the_wsgi_environ(env: Env) -> None:
    """Under WSGI the app sees QUERY_STRING without the key, the rest in order."""
    front = env.front("wsgi", env.guard(credentials=WITH_QUERY), hide_credentials=True)
    key = env.issue().key
    assert front.raw(query=f"a=1&api_key={key}&b=%20x+y&c".encode()).status == 200
    assert env.app.seen[-1]["QUERY_STRING"] == "a=1&b=%20x+y&c"


def test_t13_empty_values_count_as_missing(env: Env, face: str) -> None:
    """An empty key header or parameter is 401 as missing, with no error code."""
    front = env.front(face, env.guard(credentials=WITH_QUERY))
    for value in (b"", b" \t "):
        assert missing(front.raw(headers=[(b"x-api-key", value)])), value
    assert missing(front.raw(query=b"api_key="))
    assert env.keys.finds == 0


PREFLIGHT = [("origin", "https://app.example"), ("access-control-request-method", "POST")]


def test_t14_preflight_needs_a_key_by_default(env: Env, front: Front) -> None:
    """By default a CORS preflight without a key is refused like any other request."""
    assert missing(front.request("OPTIONS", "/orders", headers=PREFLIGHT))
    assert env.app.calls == 0


def test_t14_preflight_passes_when_allowed(env: Env, face: str) -> None:
    """allow_preflight lets a preflight through unauthenticated, and nothing else."""
    front = env.front(face, env.guard(allow_preflight=True))
    reply = front.request("OPTIONS", "/orders", headers=PREFLIGHT)
    assert reply.status == 200
    assert env.app.identity() is None
    assert missing(front.request("OPTIONS", "/orders", headers=PREFLIGHT[:1]))
    assert missing(front.request("POST", "/orders", headers=PREFLIGHT))
    assert env.app.calls == 1
