"""SECURITY.md C2 and C3 end to end: verification, enumeration, expiry, rotation, revocation."""

from __future__ import annotations

import sqlite3
import statistics
import time
from collections.abc import Callable
from contextlib import closing
from datetime import timedelta
from pathlib import Path

import pytest

from keyguard.errors import StorageError
from keyguard.lifecycle import KeyChanges
from keyguard.limiting import LimitState
from keyguard.manager import KeyManager
from keyguard.plans import resolve_policy
from keyguard.proxies import TrustedProxies
from keyguard.scopes import RouteMap, RouteRule
from tests.adapters.security_support import (
    PLANS,
    Env,
    Front,
    Issued,
    Reply,
    SpySQLiteKeyStore,
    canary,
    well_formed,
)

ORDERS = RouteMap(
    [RouteRule("GET", "/orders", "orders:read"), RouteRule("POST", "/orders", "orders:write")]
)
ATTACKER = "198.51.100.66"


def same(reply: Reply) -> tuple[int, tuple[tuple[bytes, bytes], ...], bytes]:
    return reply.status, reply.headers, reply.body


def usage(env: Env, issued: Issued) -> tuple[LimitState, ...]:
    """Where every limit of the key stands, read from the limit store without charging."""
    policy = resolve_policy(PLANS["free"], issued.record.limits)
    return tuple(env.limiter.peek(issued.record.id, policy))


def five_failures(env: Env) -> dict[str, str]:
    """A key for each failure: unknown, wrong secret, revoked, expired, rotated out."""
    victim = env.issue()
    revoked = env.issue()
    env.manager.revoke(revoked.record.id)
    expired = env.issue(expires=timedelta(hours=1))
    rotated = env.issue()
    env.manager.rotate(rotated.record.id, grace=timedelta(minutes=5))
    env.clock.advance(3600)
    return {
        "unknown": well_formed(canary()),
        "wrong secret": well_formed(victim.secret[:16] + canary()[:16]),
        "revoked": revoked.key,
        "expired": expired.key,
        "rotated out": rotated.key,
    }


def test_t16_five_failures_are_byte_identical(env: Env, front: Front) -> None:
    """Unknown, wrong, revoked, expired and rotated-out keys get the very same 401."""
    replies = {name: front.key(key) for name, key in five_failures(env).items()}
    first = replies["unknown"]
    assert first.status == 401
    assert 'error="invalid_token"' in (first.get("www-authenticate") or "")
    assert {same(r) for r in replies.values()} == {same(first)}


def test_t16_five_failures_cost_the_same(env: Env, face: str) -> None:
    """The median latency of each failure stays close to the others (generous CI slack)."""
    front = env.front(face, env.guard(auth_failures=0))
    keys = five_failures(env)
    samples: dict[str, list[float]] = {name: [] for name in keys}
    for _ in range(200):
        for name, key in keys.items():
            start = time.perf_counter()
            front.key(key)
            samples[name].append(time.perf_counter() - start)
    medians = [statistics.median(s) for s in samples.values()]
    assert max(medians) / min(medians) < 1.5


def test_t17_store_holds_digests_only(tmp_path: Path, face: str) -> None:
    """After keys are created, used, rotated and refused, the SQLite file holds no key."""
    env = Env("sqlite", tmp_path)
    try:
        front = env.front(face)
        live = env.issue(rate="10/minute")
        old = env.issue()
        new = env.manager.rotate(old.record.id, grace=timedelta(hours=1)).key.reveal()
        probe = canary()
        for key in (live.key, old.key, new, well_formed(probe)):
            front.key(key)
        secrets = [live.secret, old.secret, new.split("_", 2)[2], probe]
        with closing(sqlite3.connect(env.path)) as db:
            dump = "\n".join(db.iterdump())
        files = b"".join(p.read_bytes() for p in tmp_path.glob("keyguard.db*"))
        for secret in secrets:
            assert secret not in dump
            assert secret.encode() not in files
        assert live.record.id in dump
    finally:
        env.close()


def test_t18_bad_checksum_never_reaches_the_store(env: Env, front: Front) -> None:
    """A wrong prefix or checksum is refused offline, with the same 401 as an unknown key."""
    unknown = same(front.key(well_formed(canary())))
    lookups = env.keys.finds
    for value in (
        "kg_live_" + "A" * 38,
        "kg_live_nochecksum",
        "kg_test_" + canary() + "000000",
        "xx_live_" + canary() + "000000",
        well_formed(canary())[:-1] + "!",
        "hello",
    ):
        assert same(front.key(value)) == unknown, value
    assert env.keys.finds == lookups


def test_t20_victim_keeps_working_under_attack(env: Env, face: str) -> None:
    """Thousands of wrong secrets aimed at a key neither lock it out nor touch its counters."""
    front = env.front(face, env.guard(auth_failures=5))
    victim = env.issue(rate="1000/minute", quota_daily=1000)
    last = "y" if victim.secret[31] == "x" else "x"  # one character off, never the key itself
    near_misses = [
        well_formed(victim.secret[:31] + last),
        victim.record.id,
        victim.key[:-1] + ("y" if victim.key[-1] == "x" else "x"),
        victim.key + "0",
    ]
    served = 0
    for round_ in range(10):
        assert front.key(victim.key).status == 200
        served += 1
        before = usage(env, victim)
        for attempt in range(100):
            reply = front.key(near_misses[attempt % 4], client=ATTACKER)
            assert reply.status in {401, 429}
        assert usage(env, victim) == before, round_
    after = front.key(victim.key)
    assert after.status == 200
    assert f'"minute";r={1000 - served - 1}' in (after.get("ratelimit") or "")


def test_t21_rejected_requests_cost_nothing(env: Env, face: str) -> None:
    """401, 403 and 429 charge no window and no quota; a short-window 429 spares the long one."""
    front = env.front(face, env.guard(routes=ORDERS))
    key = env.issue(
        scopes=["orders:read"],
        rate="2/second;50/minute",
        quota_daily=100,
        ip_allow=["203.0.113.0/24"],
    )
    untouched = usage(env, key)
    new = env.manager.rotate(key.record.id, grace=timedelta(0)).key.reveal()
    headers = [("x-api-key", new)]
    assert front.key(key.key, "/orders").status == 401
    assert front.request("POST", "/orders", headers=headers).status == 403
    assert front.request("GET", "/orders", headers=headers, client="198.51.100.1").status == 403
    assert usage(env, key) == untouched
    statuses = [front.request("GET", "/orders", headers=headers).status for _ in range(5)]
    assert statuses == [200, 200, 429, 429, 429]
    remaining = {s.name: s.remaining for s in usage(env, key)}
    assert remaining == {"second": 0, "minute": 48, "daily": 98}


def test_t22_failed_attempts_are_limited_by_trusted_ip(env: Env, face: str) -> None:
    """After N failures one client IP gets 429 without any store lookup; others are unaffected."""
    front = env.front(face, env.guard(auth_failures=5))
    good = env.issue().key
    for _ in range(5):
        assert front.key(well_formed(canary()), client=ATTACKER).status == 401
    lookups = env.keys.finds
    for attempt in range(200):
        spoof = [
            ("x-api-key", well_formed(canary())),
            ("x-forwarded-for", f"192.0.2.{attempt % 250}"),
        ]
        reply = front.request(headers=spoof, client=ATTACKER)
        assert reply.status == 429
        assert reply.error()["code"] == "too_many_failed_attempts"
        assert int(reply.get("retry-after") or 0) >= 60
    assert front.key(good, client=ATTACKER).status == 429
    assert env.keys.finds == lookups
    assert front.key(good, client="198.51.100.1").status == 200
    env.clock.advance(66)
    assert front.key(good, client=ATTACKER).status == 200


def test_t22_behind_a_proxy_each_client_has_its_own_count(env: Env, face: str) -> None:
    """Behind a trusted proxy the limiter keys on the forwarded client, not the proxy."""
    guard = env.guard(auth_failures=3, proxies=TrustedProxies(networks=["10.0.0.0/8"]))
    front = env.front(face, guard)
    good = env.issue().key

    def via_proxy(key: str, client: str) -> int:
        headers = [("x-api-key", key), ("x-forwarded-for", client)]
        return front.request(headers=headers, client="10.0.0.2").status

    assert [via_proxy(well_formed(canary()), ATTACKER) for _ in range(4)] == [401, 401, 401, 429]
    assert via_proxy(good, ATTACKER) == 429
    assert via_proxy(good, "198.51.100.1") == 200
    assert front.key(good, client="10.0.0.2").status == 200


def test_t23_expiry_boundary(env: Env, front: Front) -> None:
    """A key works until the microsecond before expires_at and is refused from it on."""
    key = env.issue(expires=timedelta(hours=1))
    expires_at = key.record.expires_at
    assert expires_at is not None
    env.clock.set_wall((expires_at - timedelta(microseconds=1)).timestamp())
    assert front.key(key.key).status == 200
    env.clock.set_wall(expires_at.timestamp())
    assert same(front.key(key.key)) == same(front.key(well_formed(canary())))


def test_t24_rotation_grace(env: Env, face: str) -> None:
    """A new secret works at once, the old one until grace ends; re-rotating never extends it."""
    a, b = env.front(face), env.front(face, env.guard())
    key = env.issue()
    start = env.clock.now()
    first = env.manager.rotate(key.record.id, grace=timedelta(hours=1)).key.reveal()
    assert [f.key(k).status for f in (a, b) for k in (first, key.key)] == [200] * 4
    env.clock.set_wall(start + 1800)
    second = env.manager.rotate(key.record.id, grace=timedelta(hours=1)).key.reveal()
    assert [a.key(k).status for k in (key.key, first, second)] == [200, 200, 200]
    env.clock.set_wall(start + 3600)
    assert [b.key(k).status for k in (key.key, first, second)] == [401, 200, 200]
    env.clock.set_wall(start + 5400)
    assert [a.key(k).status for k in (key.key, first, second)] == [401, 401, 200]


def test_t24_revoking_during_grace_ends_both_secrets(env: Env, front: Front) -> None:
    """A revocation inside the grace period refuses the old and the new secret at once."""
    key = env.issue()
    new = env.manager.rotate(key.record.id, grace=timedelta(hours=1)).key.reveal()
    assert front.key(key.key).status == 200
    env.manager.revoke(key.record.id)
    assert [front.key(k).status for k in (key.key, new)] == [401, 401]


def test_t26_revocation_reaches_another_instance_at_once(env: Env, face: str) -> None:
    """Two middlewares sharing one store: a revocation through one is refused by the other."""
    other_keys = env.keys
    if env.backend == "sqlite":
        other_keys = SpySQLiteKeyStore(env.path)
        env.on_close(other_keys.close)
    a = env.front(face)
    b = env.front(face, env.guard(keys=other_keys))
    key = env.issue()
    assert (a.key(key.key).status, b.key(key.key).status) == (200, 200)
    KeyManager(env.keys, clock=env.clock).revoke(key.record.id)
    assert b.key(key.key).status == 401
    assert a.key(key.key).status == 401


def test_t28_scope_removal_takes_effect(env: Env, face: str) -> None:
    """Removing a scope from a key turns its next request into 403 insufficient_scope."""
    front = env.front(face, env.guard(routes=ORDERS))
    key = env.issue(scopes=["orders:read", "orders:write"])
    headers = [("x-api-key", key.key)]
    assert front.request("POST", "/orders", headers=headers).status == 200
    env.manager.update(key.record.id, KeyChanges(scopes=("orders:read",)))
    reply = front.request("POST", "/orders", headers=headers)
    assert reply.status == 403
    assert 'error="insufficient_scope", scope="orders:write"' in (
        reply.get("www-authenticate") or ""
    )
    assert front.request("GET", "/orders", headers=headers).status == 200


def unavailable(reply: Reply) -> bool:
    """503 key_store_unavailable with Retry-After and no-store."""
    return (
        reply.status == 503
        and reply.error()["code"] == "key_store_unavailable"
        and int(reply.get("retry-after") or 0) >= 1
        and reply.get("cache-control") == "no-store"
    )


def test_t29_store_down_is_503_never_401_or_200(env: Env, front: Front) -> None:
    """With the key store failing, known and unknown keys alike get 503 with Retry-After."""
    known = env.issue().key
    env.keys.failure = StorageError("the key store is down")
    for _ in range(30):
        assert unavailable(front.key(known))
        assert unavailable(front.key(well_formed(canary())))
    assert env.app.calls == 0
    env.keys.failure = None
    assert front.key(known).status == 200


def _close(env: Env) -> None:
    env.keys.close()


def _damage(env: Env) -> None:
    with closing(sqlite3.connect(env.path, isolation_level=None)) as db:
        db.execute("UPDATE keys SET data = '{not json'")


def _drop(env: Env) -> None:
    with closing(sqlite3.connect(env.path, isolation_level=None)) as db:
        db.execute("DROP TABLE key_digests")


@pytest.mark.parametrize("fault", [_close, _damage, _drop])
def test_t29_sqlite_faults_fail_closed(
    tmp_path: Path, face: str, fault: Callable[[Env], None]
) -> None:
    """A closed store, a damaged record or a dropped table is 503, never 401 for a good key."""
    env = Env("sqlite", tmp_path)
    try:
        front = env.front(face)
        known = env.issue().key
        assert front.key(known).status == 200
        fault(env)
        assert unavailable(front.key(known))
        assert env.app.calls == 1
    finally:
        env.close()
