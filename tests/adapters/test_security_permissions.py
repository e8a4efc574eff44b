"""SECURITY.md C5 (scopes, routes) and C6 (IP allow-lists, proxies) through the middleware."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route, Router

from keyguard.errors import ConfigurationError, InvalidInput
from keyguard.keys import KeyFormat, KeyHasher
from keyguard.plans import resolve_policy
from keyguard.proxies import TrustedProxies
from keyguard.records import AuditEvent, KeyRecord, SecretDigest
from keyguard.scopes import RouteMap, RouteRule
from tests.adapters.security_support import (
    PLANS,
    Downstream,
    Env,
    Reply,
    asgi_call,
    http_scope,
)

ORDERS = RouteMap(
    [
        RouteRule("GET", "/orders", "orders:read"),
        RouteRule("POST", "/orders", "orders:write"),
        RouteRule("GET", "/admin", "admin:all"),
    ]
)
PROXY = "10.0.0.5"
BEHIND_PROXY = TrustedProxies(networks=["10.0.0.0/8"])


def ip_refused(reply: Reply) -> bool:
    return reply.status == 403 and reply.error()["code"] == "ip_not_allowed"


def stored_key(env: Env, scopes: tuple[str, ...]) -> str:
    """A key whose record is written straight to the store, unvalidated, as a foreign tool might."""
    key = KeyFormat().generate()
    now = datetime.fromtimestamp(env.clock.now(), UTC)
    record = KeyRecord(
        id="key_" + key.reveal()[-12:],
        name="stored",
        hint="kg_live_…",
        digests=(SecretDigest(KeyHasher().digest(key)),),
        created_at=now,
        updated_at=now,
        scopes=scopes,
    )
    env.keys.save(record, AuditEvent(now, "test", "create", record.id))
    return key.reveal()


def test_t48_least_privilege(env: Env, face: str) -> None:
    """A read-only key writing gets 403 naming the scope; the handler never runs, nothing counts."""
    front = env.front(face, env.guard(routes=ORDERS))
    key = env.issue(scopes=["orders:read"], rate="10/minute", quota_daily=10)
    policy = resolve_policy(PLANS["free"], key.record.limits)
    before = env.limiter.peek(key.record.id, policy)
    reply = front.request("POST", "/orders", headers=[("x-api-key", key.key)])
    assert reply.status == 403
    assert reply.error()["code"] == "insufficient_permissions"
    challenge = reply.get("www-authenticate")
    assert challenge == 'Bearer realm="api", error="insufficient_scope", scope="orders:write"'
    assert env.app.calls == 0
    assert env.limiter.peek(key.record.id, policy) == before
    assert front.request("GET", "/orders", headers=[("x-api-key", key.key)]).status == 200


GRANTS = [
    (("orders:*",), 200),
    (("*",), 200),
    (("orders:write",), 200),
    (("ORDERS:WRITE",), 403),
    (("orders:write ",), 403),
    ((" orders:write",), 403),
    (("orders\uff1awrite",), 403),
    (("orders\u02d0write",), 403),
    (("orders",), 403),
    (("orders:",), 403),
    (("orders:w*",), 403),
    (("ord*",), 403),
    (("orders:*:write",), 403),
    (("orders:write:all",), 403),
    (("orders:read", "admin:*"), 403),
]


def test_t49_permission_string_tricks(env: Env, face: str) -> None:
    """Only exact scopes and the documented wildcards grant orders:write, even for stored data."""
    front = env.front(face, env.guard(routes=ORDERS))
    for granted, expected in GRANTS:
        headers = [("x-api-key", stored_key(env, granted))]
        assert front.request("POST", "/orders", headers=headers).status == expected, granted
    assert env.app.calls == 3


def starlette_app(calls: list[str]) -> Router:
    """A case-sensitive router, as the app behind the middleware would route."""

    async def admin(request: Request) -> PlainTextResponse:
        calls.append(request.url.path)
        return PlainTextResponse("admin")

    return Router([Route("/admin", admin)])


def exact_wsgi_app(calls: list[str]) -> Callable[..., Iterable[bytes]]:
    """The WSGI counterpart: exact, case-sensitive path matching."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ["PATH_INFO"] == "/admin":
            calls.append(environ["PATH_INFO"])
            start_response("200 OK", [("content-type", "text/plain")])
            return [b"admin"]
        start_response("404 Not Found", [("content-type", "text/plain")])
        return [b"not found"]

    return app


SPELLINGS = [
    ("/admin/", 403),
    ("//admin", 400),
    ("/admin/..", 400),
    ("/./admin", 400),
    ("/admin/.", 400),
    ("/x/../admin", 400),
    ("/ADMIN", 404),
    ("/admin;x", 404),
    ("/Admin/", 404),
]


def test_t50_route_normalisation(env: Env, face: str) -> None:
    """Every spelling of /admin is checked as the router reads it: no handler runs without admin."""
    calls: list[str] = []
    front = env.front(face, env.guard(routes=ORDERS))
    front.asgi.app = starlette_app(calls)
    front.wsgi.app = exact_wsgi_app(calls)
    other = [(b"x-api-key", env.issue(scopes=["orders:*"]).key.encode())]
    for path, status in SPELLINGS:
        assert front.raw(path=path, headers=other).status == status, path
    assert calls == []
    admin = [(b"x-api-key", env.issue(scopes=["admin:all"]).key.encode())]
    assert front.raw(path="/admin", headers=admin).status == 200
    assert calls == ["/admin"]


def test_t51_forwarded_headers_ignored_without_a_trusted_proxy(env: Env, face: str) -> None:
    """With no trusted proxy, X-Forwarded-For and Forwarded cannot lend an allowed address."""
    front = env.front(face)
    key = env.issue(ip_allow=["198.51.100.0/24"]).key
    for spoof in (("x-forwarded-for", "198.51.100.5"), ("forwarded", "for=198.51.100.5")):
        assert ip_refused(front.request(headers=[("x-api-key", key), spoof]))
    assert front.key(key, client="198.51.100.5").status == 200


def test_t52_rightmost_untrusted_entry_is_the_client(env: Env, face: str) -> None:
    """Behind a trusted proxy the right-most untrusted entry is the client, not a forged one."""
    front = env.front(face, env.guard(proxies=BEHIND_PROXY))
    inside = env.issue(ip_allow=["10.0.0.0/8"]).key
    outside = env.issue(ip_allow=["203.0.113.0/24"]).key

    def status(key: str) -> int:
        headers = [("x-api-key", key), ("x-forwarded-for", "10.1.1.1, 203.0.113.9")]
        return front.request(headers=headers, client=PROXY).status

    assert (status(inside), status(outside)) == (403, 200)


def test_t52_hops_take_the_nth_from_the_right(env: Env, face: str) -> None:
    """ProxyFix semantics: the N-th entry from the right; with fewer entries, the peer."""
    for hops, client in ((1, "203.0.113.9"), (2, "10.1.1.1"), (3, PROXY)):
        front = env.front(face, env.guard(proxies=TrustedProxies(hops=hops)))
        key = env.issue(ip_allow=[client]).key
        headers = [("x-api-key", key), ("x-forwarded-for", "10.1.1.1, 203.0.113.9")]
        assert front.request(headers=headers, client=PROXY).status == 200, hops
        identity = env.app.identity()
        assert identity is not None
        assert identity.client_ip == client


def test_t53_trusting_everyone_is_refused_or_loudly_opted_into(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``*`` is a configuration error unless allow_all=True, which logs a warning."""
    for everything in ("*", "0.0.0.0/0", "::/0"):
        with pytest.raises(ConfigurationError):
            TrustedProxies(networks=[everything])
    with caplog.at_level(logging.WARNING, logger="keyguard"):
        TrustedProxies(networks=["*"], allow_all=True)
    assert any("trusts every address" in r.getMessage() for r in caplog.records)


def test_t54_forwarded_for_lines_are_joined_in_order(env: Env, face: str) -> None:
    """X-Forwarded-For split over lines reads as one list, not as its last line."""
    front = env.front(face, env.guard(proxies=BEHIND_PROXY))
    key = env.issue(ip_allow=["203.0.113.0/24"]).key.encode()
    split = [(b"x-forwarded-for", b"203.0.113.9"), (b"x-forwarded-for", b"10.1.1.2")]
    joined = [(b"x-forwarded-for", b"203.0.113.9, 10.1.1.2")]
    for lines in (split, joined):
        assert front.raw(headers=[(b"x-api-key", key), *lines], client=PROXY).status == 200


def test_t55_junk_in_forwarded_for(env: Env, face: str) -> None:
    """An entry that is no address leaves the client unknown: restricted keys 403, never a 500."""
    front = env.front(face, env.guard(proxies=BEHIND_PROXY))
    restricted = [(b"x-api-key", env.issue(ip_allow=["203.0.113.0/24", "10.0.0.0/8"]).key.encode())]
    free = [(b"x-api-key", env.issue().key.encode())]
    junk = [b"unknown", b"", b"1.2.3.4:5678", b"[2001:db8::1]:443", b"_hidden", b"203.0.113.9 x"]
    for entry in junk:
        forwarded = (b"x-forwarded-for", entry + b", 10.1.1.1")
        assert ip_refused(front.raw(headers=[*restricted, forwarded], client=PROXY)), entry
        assert front.raw(headers=[*free, forwarded], client=PROXY).status == 200, entry
    assert front.errors == []


def test_t55_only_the_configured_header_family_is_read(env: Env, face: str) -> None:
    """``Forwarded`` is ignored when X-Forwarded-For is the trusted header, and vice versa."""
    key = env.issue(ip_allow=["203.0.113.0/24"]).key
    xff = env.front(face, env.guard(proxies=BEHIND_PROXY))
    rfc = env.front(
        face, env.guard(proxies=TrustedProxies(networks=["10.0.0.0/8"], header="forwarded"))
    )
    forwarded = ("forwarded", "for=203.0.113.9")
    x_forwarded = ("x-forwarded-for", "203.0.113.9")
    assert ip_refused(xff.request(headers=[("x-api-key", key), forwarded], client=PROXY))
    assert ip_refused(rfc.request(headers=[("x-api-key", key), x_forwarded], client=PROXY))
    assert rfc.request(headers=[("x-api-key", key), forwarded], client=PROXY).status == 200


def test_t56_non_canonical_addresses_are_denied(env: Env, face: str) -> None:
    """Ambiguous IPv4 spellings never match an allow-list, as a peer or forwarded."""
    key = [(b"x-api-key", env.issue(ip_allow=["10.0.0.0/8"]).key.encode())]
    direct = env.front(face)
    proxied = env.front(face, env.guard(proxies=BEHIND_PROXY))
    for spelling in ("010.0.0.1", "10.1", "167772161", "0xA.0.0.1", "10.0.0.1."):
        forwarded = (b"x-forwarded-for", spelling.encode())
        assert ip_refused(direct.raw(headers=key, client=spelling)), spelling
        assert ip_refused(direct.raw(headers=key, client=f" {spelling} ")), spelling
        assert ip_refused(proxied.raw(headers=[*key, forwarded], client=PROXY)), spelling


def test_t56_t57_ambiguous_allow_list_entries_are_refused(tmp_path: Path) -> None:
    """Integers, leading zeros, short forms and host bits are refused when the key is made."""
    env = Env("memory", tmp_path)
    try:
        for entry in ("167772161", "010.0.0.0/8", "10.1/16", "10.0.0.1/8", " 10.0.0.0/8"):
            with pytest.raises(InvalidInput):
                env.issue(ip_allow=[entry])
    finally:
        env.close()


def test_t57_addresses_are_normalised(env: Env, face: str) -> None:
    """IPv4-mapped IPv6 and zone ids match the networks they belong to."""
    front = env.front(face)
    pairs = [
        ("::ffff:10.1.2.3", "10.0.0.0/8"),
        ("10.1.2.3", "::ffff:10.0.0.0/104"),
        ("fe80::1%eth0", "fe80::/64"),
    ]
    for peer, allowed in pairs:
        key = [(b"x-api-key", env.issue(ip_allow=[allowed]).key.encode())]
        assert front.raw(headers=key, client=peer).status == 200, peer


def test_t58_no_client_address(env: Env, face: str) -> None:
    """Without a client address IP-restricted keys are refused and others are unaffected."""
    front = env.front(face)
    restricted = [(b"x-api-key", env.issue(ip_allow=["203.0.113.0/24"]).key.encode())]
    free = [(b"x-api-key", env.issue().key.encode())]
    for peer in (None, "", "/run/app.sock", "unix:/run/app.sock"):
        assert ip_refused(front.raw(headers=restricted, client=peer)), peer
        assert front.raw(headers=free, client=peer).status == 200, peer


def test_t58_asgi_scope_without_client_key(env: Env) -> None:
    """An ASGI scope with no ``client`` entry at all is handled like ``client = None``."""
    front = env.front("asgi")
    restricted = env.issue(ip_allow=["203.0.113.0/24"]).key.encode()
    scope = http_scope(headers=[(b"x-api-key", restricted)])
    del scope["client"]
    assert ip_refused(env.run(asgi_call(front.asgi, scope)))


@pytest.mark.parametrize("proxies", [TrustedProxies(), BEHIND_PROXY])
def test_t59_spoofed_forwarded_for_makes_no_new_buckets(
    env: Env, face: str, proxies: TrustedProxies
) -> None:
    """Rotating X-Forwarded-For from one untrusted peer feeds one failure bucket, not many."""
    guard = env.guard(proxies=proxies, auth_failures=1000)
    front = env.front(face, guard, app=Downstream())
    for n in range(50):
        headers = [("x-api-key", "kg_live_bad"), ("x-forwarded-for", f"192.0.2.{n}")]
        assert front.request(headers=headers).status == 401
    assert guard._failures is not None
    assert len(guard._failures) == 1
