"""The decision flow, without any framework: the same answers sync and async."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Protocol

import pytest

from keyguard.backends.memory import MemoryKeyStore
from keyguard.backends.memory_limiter import MemoryRateStore
from keyguard.denials import Denial
from keyguard.errors import ConfigurationError, StorageError
from keyguard.guard import Allow, Decision, Guard
from keyguard.keys import KeyFormat
from keyguard.limiting import Admission, HitRequest
from keyguard.manager import KeyManager
from keyguard.plans import Plan, ServiceLimits
from keyguard.records import KeyRecord, LimitOverrides
from keyguard.request import RequestInfo
from keyguard.scopes import RouteMap, RouteRule
from keyguard.testing import FakeClock, memory_guard

ROUTES = RouteMap(
    [
        RouteRule("POST", "/v1/generate", "text:generate"),
        RouteRule("GET", "/v1/images", "image:create"),
    ],
    public=["/health"],
)
PLANS = {"free": Plan("free", "3/minute", None, 100, 2)}


def req(
    path: str = "/v1/generate",
    key: str | None = None,
    method: str = "POST",
    peer: str | None = "203.0.113.7",
) -> RequestInfo:
    headers = () if key is None else ((b"x-api-key", key.encode()),)
    return RequestInfo(method=method, path=path, headers=headers, peer=peer)


class Decide(Protocol):
    def __call__(self, guard: Guard, info: RequestInfo) -> Decision: ...


@pytest.fixture(params=["sync", "async"])
def decide(request: pytest.FixtureRequest) -> Decide:
    """Runs a guard's check through the sync or the async driver."""

    def run(guard: Guard, info: RequestInfo) -> Decision:
        if request.param == "sync":
            return guard.check(info)
        return asyncio.run(guard.acheck(info))

    return run


def code(decision: Decision) -> str:
    return decision.code if isinstance(decision, Denial) else "allow"


def test_public_path_needs_no_key(decide: Decide) -> None:
    """A public path is allowed with no identity and no limit headers."""
    guard, _ = memory_guard(routes=ROUTES)
    decision = decide(guard, req("/health", method="GET"))
    assert decision == Allow(None)


def test_the_checks_in_order(decide: Decide) -> None:
    """Missing, malformed, unknown, wrong scope and allowed, each with its own code."""
    clock = FakeClock()
    guard, manager = memory_guard(routes=ROUTES, clock=clock, plans=PLANS)
    key = manager.create("k", scopes=["text:*"]).key.reveal()
    run = decide
    assert code(run(guard, req())) == "missing_api_key"
    assert code(run(guard, req(key="kg_live_nope"))) == "invalid_api_key"
    assert code(run(guard, req("/v1/images", key, "GET"))) == "insufficient_permissions"
    allowed = run(guard, req(key=key))
    assert isinstance(allowed, Allow)
    assert allowed.identity is not None
    assert allowed.identity.scopes == ("text:*",)
    assert allowed.identity.service == "text:generate"
    assert allowed.lease is not None
    guard.release(allowed.lease)


def test_limits_refuse_and_name_the_window() -> None:
    """The fourth request in a 3/minute window is refused with rate_limit_exceeded."""
    clock = FakeClock()
    guard, manager = memory_guard(clock=clock, plans=PLANS)
    key = manager.create("k").key.reveal()
    for _ in range(3):
        decision = guard.check(req(key=key))
        assert isinstance(decision, Allow)
        assert decision.lease is not None
        guard.release(decision.lease)
    refused = guard.check(req(key=key))
    assert isinstance(refused, Denial)
    assert refused.code == "rate_limit_exceeded"
    assert refused.retry_after is not None
    assert refused.retry_after > 0
    assert refused.detail is not None
    assert "minute" in refused.detail
    clock.advance(refused.retry_after)
    assert isinstance(guard.check(req(key=key)), Allow)


def test_key_overrides_beat_the_plan() -> None:
    """A key's own rate replaces its plan's."""
    guard, manager = memory_guard(plans=PLANS)
    key = manager.create("k", limits=LimitOverrides(rate="1/minute", concurrency=None)).key
    first = guard.check(req(key=key.reveal()))
    assert isinstance(first, Allow)
    assert code(guard.check(req(key=key.reveal()))) == "rate_limit_exceeded"


def test_service_cost_charges_the_quota() -> None:
    """A service that costs 60 units empties a 100-unit quota after one call."""
    guard, manager = memory_guard(
        plans={"free": Plan("free", None, None, 100, None)},
        services={"text:generate": ServiceLimits(cost=60)},
        routes=ROUTES,
    )
    key = manager.create("k", scopes=["*"]).key.reveal()
    assert isinstance(guard.check(req(key=key)), Allow)
    refused = guard.check(req(key=key))
    assert code(refused) == "quota_exceeded"


class BrokenLimiter(MemoryRateStore):
    """A limiter whose store is down."""

    def hit(self, request: HitRequest) -> Admission:
        raise StorageError("down")

    async def ahit(self, request: HitRequest) -> Admission:
        raise StorageError("down")


class BrokenKeys(MemoryKeyStore):
    """A key store that cannot be reached."""

    def find(self, digest: str) -> KeyRecord | None:
        raise StorageError("down")

    async def afind(self, digest: str) -> KeyRecord | None:
        raise StorageError("down")


@pytest.mark.parametrize(
    ("policy", "expected"), [("deny", "limiter_unavailable"), ("allow", "allow")]
)
def test_limiter_failure_policy(decide: Decide, policy: str, expected: str) -> None:
    """A failing limit store answers 503 or lets the request through, as configured."""
    store = MemoryKeyStore()
    guard = Guard(keys=store, limiter=BrokenLimiter(), on_limiter_error=policy)  # type: ignore[arg-type]
    key = KeyManager(store).create("k").key.reveal()
    decision = decide(guard, req(key=key))
    assert code(decision) == expected
    if isinstance(decision, Allow):
        assert decision.headers == ()


def test_t29_key_store_down_fails_closed(decide: Decide) -> None:
    """An unreachable key store is a 503 with Retry-After, never a 401 or a 200."""
    guard = Guard(keys=BrokenKeys(), limiter=MemoryRateStore())
    decision = decide(guard, req(key=KeyFormat().generate().reveal()))
    assert isinstance(decision, Denial)
    assert decision.code == "key_store_unavailable"
    assert decision.retry_after is not None


def test_reveal_key_status_is_opt_in() -> None:
    """Revoked keys look unknown unless the deployment asks for the reason."""
    for reveal, expected in ((False, "invalid_api_key"), (True, "api_key_revoked")):
        guard, manager = memory_guard(reveal_key_status=reveal)
        issued = manager.create("k")
        manager.revoke(issued.record.id)
        assert code(guard.check(req(key=issued.key.reveal()))) == expected


def test_expiry_warning_header() -> None:
    """A key that expires within the horizon carries X-API-Key-Expires."""
    guard, manager = memory_guard(expiry_warning=timedelta(days=7))
    soon = manager.create("soon", expires="3d").key.reveal()
    later = manager.create("later", expires="30d").key.reveal()
    headers = dict(_allow(guard.check(req(key=soon))).headers)
    assert b"x-api-key-expires" in headers
    assert b"x-api-key-expires" not in dict(_allow(guard.check(req(key=later))).headers)


def _allow(decision: Decision) -> Allow:
    assert isinstance(decision, Allow)
    return decision


@pytest.mark.parametrize(
    "options",
    [{"on_limiter_error": "maybe"}, {"realm": 'api"\r\n'}, {"auth_failures": -1}],
)
def test_bad_configuration_is_refused(options: dict[str, object]) -> None:
    """Contradictory or header-breaking options fail at construction."""
    with pytest.raises(ConfigurationError):
        Guard(keys=MemoryKeyStore(), **options)  # type: ignore[arg-type]


def test_two_guards_do_not_interfere() -> None:
    """Two guards in one process keep separate failure counters and limits."""
    a, _ = memory_guard(auth_failures=2)
    b, _ = memory_guard(auth_failures=2)
    for _ in range(3):
        a.check(req(key="kg_live_bad"))
    assert code(a.check(req(key="kg_live_bad"))) == "too_many_failed_attempts"
    assert code(b.check(req(key="kg_live_bad"))) == "invalid_api_key"
    assert code(a.check(req(key="kg_live_bad", peer="198.51.100.1"))) == "invalid_api_key"


def test_a_key_on_an_unknown_plan_gets_the_default_plan_limits() -> None:
    """A plan name nobody configured falls back to the default plan, never to no limits."""
    guard, manager = memory_guard(plans=PLANS, default_plan="free")
    key = manager.create("typo", plan="fre").key.reveal()
    for _ in range(3):
        allowed = guard.check(req(key=key))
        assert isinstance(allowed, Allow)
        assert allowed.lease is not None
        guard.release(allowed.lease)
    assert code(guard.check(req(key=key))) == "rate_limit_exceeded"


def test_a_key_on_an_unknown_plan_without_a_default_is_refused() -> None:
    """With no default plan to fall back on, such a key is refused, never unlimited."""
    guard, manager = memory_guard(plans=PLANS, default_plan="gold")
    key = manager.create("typo", plan="fre").key.reveal()
    assert code(guard.check(req(key=key))) == "plan_not_available"


def test_a_well_formed_key_is_parsed_once_and_a_malformed_one_every_time(
    decide: Decide,
) -> None:
    """The guard remembers digests of keys that passed the offline checks, not keys:
    the same key is not parsed again, while a key one character off (another digest)
    is parsed, and refused, on every attempt."""
    parsed: list[str] = []

    class CountingFormat(KeyFormat):
        def parse(self, raw: object) -> object:  # type: ignore[override]
            parsed.append("x")
            return super().parse(raw)  # type: ignore[arg-type]

    guard, manager = memory_guard(routes=ROUTES, plans=PLANS, key_format=CountingFormat())
    key = manager.create("k", scopes=("text:generate",)).key.reveal()
    broken = key[:-1] + ("A" if key[-1] != "A" else "B")  # the checksum no longer matches
    for _ in range(2):
        assert code(decide(guard, req(key=key))) == "allow"
    assert len(parsed) == 1
    for _ in range(2):
        assert code(decide(guard, req(key=broken))) == "invalid_api_key"
    assert len(parsed) == 3
    assert code(decide(guard, req(key="kg_live_é" + key[9:]))) == "invalid_request"
