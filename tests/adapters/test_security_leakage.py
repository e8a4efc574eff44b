"""SECURITY.md C7 through the middleware: nothing secret reaches a response, a log or the app."""

from __future__ import annotations

import logging
import traceback

import pytest
from http_sfv.list import List as SfList

from keyguard.credentials import CredentialConfig
from keyguard.errors import StorageError
from keyguard.keys import KeyHasher, Secret
from keyguard.scopes import RouteMap, RouteRule
from tests.adapters.security_support import (
    Env,
    Front,
    Reply,
    canary,
    sweep,
    well_formed,
)

WITH_QUERY = CredentialConfig(methods=("header", "bearer", "query"))
ORDERS = RouteMap([RouteRule("POST", "/orders", "orders:write")])
CLIENT_SIDE = ("httpx", "httpcore")  # the test client's own loggers, not the server's


def server_logs(caplog: pytest.LogCaptureFixture) -> str:
    """Every server-side log record: message, arguments and any formatted exception."""
    records = [r for r in caplog.records if not r.name.startswith(CLIENT_SIDE)]
    return "\n".join(f"{r.getMessage()} {r.args!r} {r.exc_text or ''}" for r in records)


def exceptions(front: Front) -> str:
    return "\n".join("".join(traceback.format_exception(e)) + repr(e) for e in front.errors)


def provoke(env: Env, front: Front, path: str) -> tuple[list[Reply], list[str]]:
    """Send credentials carrying secrets down one path; return the replies and the secrets."""
    if path == "200":
        key = env.issue()
        query = env.issue()
        replies = [front.key(key.key), front.request(query=f"api_key={query.key}")]
        return replies, [key.secret, query.secret]
    if path == "400":
        a, b = canary(), canary()
        headers = [("x-api-key", well_formed(a)), ("authorization", f"Bearer {well_formed(b)}")]
        return [front.request(headers=headers)], [a, b]
    if path == "401":
        a, b = canary(), canary()
        bearer = front.request(headers=[("authorization", f"Bearer {well_formed(b)}")])
        return [front.key(well_formed(a)), bearer, front.key(f'"{a}{b}"')], [a, b]
    if path == "403":
        key = env.issue(scopes=["orders:read"])
        return [front.request("POST", "/orders", headers=[("x-api-key", key.key)])], [key.secret]
    if path == "429":
        key = env.issue(rate="1/minute")
        return [front.key(key.key), front.key(key.key)], [key.secret]
    if path == "500":
        key = env.issue()
        env.app.failure = RuntimeError("the handler failed")
        return [front.key(key.key)], [key.secret]
    a = canary()
    env.keys.failure = StorageError("the key store is down")
    return [front.key(well_formed(a))], [a]


@pytest.mark.parametrize("path", ["200", "400", "401", "403", "429", "500", "503"])
def test_t60_canary_sweep(env: Env, face: str, path: str, caplog: pytest.LogCaptureFixture) -> None:
    """On every path the secret is absent from responses, logs, exceptions and the app's view."""
    caplog.set_level(logging.DEBUG)
    guard = env.guard(routes=ORDERS, credentials=WITH_QUERY)
    front = env.front(face, guard, hide_credentials=True)
    replies, secrets = provoke(env, front, path)
    assert replies[-1].status == int(path)
    assert (front.errors != []) == (path == "500")
    sinks = [
        *(r.dump() for r in replies),
        server_logs(caplog),
        exceptions(front),
        repr(env.app.seen),
    ]
    for secret in secrets:
        for sink in sinks:
            assert secret not in sink


class LeakyHasher(KeyHasher):
    """A custom hasher with a bug whose message quotes the key it was given."""

    def digest(self, key: Secret) -> str:
        raise ValueError(f"cannot hash {key.reveal()}")


class LeakyStoreError(Exception):
    """What a careless custom store might raise: the digest in the message."""


def test_t63_exception_quoting_the_key_becomes_a_generic_500(
    env: Env, face: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A verifier bug quoting the key is a generic 500; the log names the type, not the text."""
    caplog.set_level(logging.DEBUG)
    front = env.front(face, env.guard(hasher=LeakyHasher()))
    secret = canary()
    reply = front.key(well_formed(secret))
    assert reply.status == 500
    assert reply.error() == {
        "code": "internal_error",
        "message": "An internal error occurred.",
        "type": "api_error",
    }
    assert reply.get("cache-control") == "no-store"
    assert front.errors == []
    logs = server_logs(caplog)
    assert "ValueError" in logs
    assert secret not in logs
    assert secret not in reply.dump()


@pytest.mark.parametrize("failure", [StorageError, LeakyStoreError])
def test_t63_store_errors_quoting_the_digest_stay_inside(
    env: Env, face: str, failure: type[Exception], caplog: pytest.LogCaptureFixture
) -> None:
    """Store exceptions naming the digest answer 503 or 500 and never show the digest."""
    caplog.set_level(logging.DEBUG)
    front = env.front(face)
    key = env.issue()
    digest = KeyHasher().digest(Secret(key.key))
    env.keys.failure = failure(f"lookup of {digest} for {key.key} failed")
    reply = front.key(key.key)
    assert reply.status == (503 if failure is StorageError else 500)
    assert front.errors == []
    for sink in (reply.dump(), server_logs(caplog)):
        assert digest not in sink
        assert key.secret not in sink


def test_t65_refusals_are_never_cached(env: Env, face: str) -> None:
    """Every refusal carries Cache-Control: no-store and Vary on both credential headers."""
    refusals = [(label, r) for label, r in sweep(env, face) if r.status >= 400]
    assert {r.status for _, r in refusals} == {400, 401, 403, 429, 500, 503}
    for label, reply in refusals:
        assert reply.get("cache-control") == "no-store", label
        vary = {v.strip() for line in reply.values("vary") for v in line.split(",")}
        assert {"authorization", "x-api-key"} <= vary, label


@pytest.mark.parametrize("method", ["header", "bearer", "query"])
def test_t66_credentials_hidden_downstream(env: Env, face: str, method: str) -> None:
    """With hide_credentials the app gets the principal and none of the credential."""
    front = env.front(face, env.guard(credentials=WITH_QUERY), hide_credentials=True)
    key = env.issue(scopes=["orders:read"])
    headers = [("x-trace", "1")]
    query = "page=2"
    if method == "header":
        headers += [("x-api-key", key.key), ("authorization", "Basic dXNlcjpwdw==")]
    elif method == "bearer":
        headers.append(("authorization", f"Bearer {key.key}"))
    else:
        query = f"page=2&api_key={key.key}"
    assert front.request(headers=headers, query=query).status == 200
    seen = env.app.seen[-1]
    assert key.key not in repr(seen)
    identity = env.app.identity()
    assert identity is not None
    assert (identity.key_id, identity.scopes, identity.auth_method) == (
        key.record.id,
        ("orders:read",),
        method,
    )
    if face == "asgi":
        names = {name for name, _ in seen["headers"]}
        query_string = seen["query_string"].decode()
    else:
        names = {k[5:].lower().replace("_", "-").encode() for k in seen if k.startswith("HTTP_")}
        query_string = seen["QUERY_STRING"]
    assert b"x-api-key" not in names
    assert b"x-trace" in names
    assert (b"authorization" in names) == (method == "header")
    assert query_string == "page=2"


def test_t67_no_partition_key_or_key_id_in_limit_headers(env: Env, face: str) -> None:
    """RateLimit fields carry no pk, and no header names the key or its id."""
    front = env.front(face)
    key = env.issue(rate="1/minute", quota_daily=10, concurrency=2)
    for reply in (front.key(key.key), front.key(key.key)):
        for field in ("ratelimit", "ratelimit-policy"):
            parsed = SfList()
            parsed.parse((reply.get(field) or "").encode())
            assert all("pk" not in item.params for item in parsed)
        headers = "\n".join(f"{k!r}{v!r}" for k, v in reply.headers)
        assert key.record.id not in headers
        assert key.secret not in headers
