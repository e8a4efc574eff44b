"""Where keyguard's time per request goes: each stage of the decision, timed alone.

The stages are the steps :class:`~keyguard.guard.Guard` takes for an allowed request
with the full policy of the enforcement suite, each called through keyguard's public
functions with the same inputs the guard gives them. Their sum set against the whole
``Guard.check`` shows what the flow itself (generators, the driver, the decision
objects) costs; ``Guard.acheck`` against ``Guard.check`` shows what the async face
adds. The key's windows here are far above anything the run can reach (a stage is
timed millions of times a minute), which changes no cost: the work per hit is the same.

Run it with ``python -m benchmarks --only breakdown``; a profiler view of the same
request is ``python -m benchmarks.profile``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime

from keyguard.adapters.asgi import request_from_scope
from keyguard.adapters.wsgi import guarded_headers, request_from_environ
from keyguard.backends.memory_limiter import MemoryRateStore
from keyguard.credentials import CredentialConfig, extract_credential
from keyguard.guard import Allow, Guard
from keyguard.iprules import IPAllowList
from keyguard.keys import KeyFormat, KeyHasher
from keyguard.lifecycle import check_secret
from keyguard.limiting import HitRequest, LimitPolicy, RateBackend, Window
from keyguard.plans import resolve_policy
from keyguard.proxies import TrustedProxies
from keyguard.ratelimit_headers import limit_headers
from keyguard.records import KeyRecord
from keyguard.request import RequestInfo
from keyguard.scopes import scope_allows

from . import enforcement as enf
from ._harness import Settings, SuiteReport, Timing, ameasure, measure

__all__ = ["run"]

SUITE = "breakdown"
_UNREACHABLE = "1000000000/minute;1000000000/hour;1000000000/day"
# The failed-attempt limiter of the client's address (Guard(auth_failures=20)): the
# guard looks the address's bucket up on every request and peeks it only if it exists.
_FAILURES = LimitPolicy(windows=(Window("auth-failures", 20, 60),))


def _guard_and_key() -> tuple[Guard, str, KeyRecord]:
    guard = enf.memory_guard()
    saved = enf.RATE
    enf.RATE = _UNREACHABLE  # the same policy shape, limits out of reach
    try:
        key = enf.issue_keys(guard.backends.keys, 1)[0]
    finally:
        enf.RATE = saved
    record = guard.backends.keys.find(KeyHasher().digest(KeyFormat().parse(key).secret))
    if record is None:  # pragma: no cover - issue_keys just saved it
        raise RuntimeError("the key was not saved")
    return guard, key, record


def _repeat(fn: Callable[[], object]) -> Callable[[int], None]:
    def loop(n: int) -> None:
        for _ in range(n):
            fn()

    return loop


def run(settings: Settings) -> SuiteReport:
    report = SuiteReport(SUITE)
    guard, key, record = _guard_and_key()
    limiter = guard.backends.limiter
    if limiter is None or guard.routes is None:  # pragma: no cover - built with both
        raise RuntimeError("the benchmark guard has no limiter or routes")
    scope = {**enf.scope_base(), "headers": enf.request_headers(key)}
    environ = {**enf.environ_base(), "HTTP_X_API_KEY": key}
    wanted = guarded_headers(guard)  # as KeyGuardWSGIMiddleware reads only these
    request = request_from_scope(scope)
    proxies, credentials = TrustedProxies(), CredentialConfig()
    client = proxies.client_ip(request)
    if client is None:  # pragma: no cover - the scope has a client
        raise RuntimeError("no client address")
    ip = client.ip
    fmt, hasher, keys = KeyFormat(), KeyHasher(), guard.backends.keys
    digest = hasher.digest(fmt.parse(key).secret)
    needed = "text:generate"
    policy = resolve_policy(guard.plans.get(record.plan), record.limits, needed, None)
    states = limiter.hit(HitRequest(record.id, policy, 1, "probe")).states
    limiter.release(record.id, "probe")
    routes = guard.routes
    failures = MemoryRateStore()  # as Guard's own, which it peeks for every request
    leases = iter(range(10**12))

    def hit_and_release(store: RateBackend = limiter) -> None:
        lease = str(next(leases))
        store.hit(HitRequest(record.id, policy, 1, lease))
        store.release(record.id, lease)

    def lookup() -> None:
        check_secret(keys.find(digest), digest, datetime.now(UTC))

    stages: list[tuple[str, Callable[[], object]]] = [
        ("adapter: request_from_scope (ASGI)", lambda: request_from_scope(scope)),
        (
            "adapter: request_from_environ (WSGI)",
            lambda: request_from_environ(environ, wanted),
        ),
        ("route: RouteMap.match", lambda: routes.match("GET", enf.PATH)),
        ("client: TrustedProxies.client_ip", lambda: proxies.client_ip(request)),
        ("failed-attempt check: bucket in MemoryRateStore", lambda: f"ip:{ip}" in failures),
        ("  (information) MemoryRateStore.peek", lambda: failures.peek(f"ip:{ip}", _FAILURES)),
        ("credential: extract_credential", lambda: extract_credential(request, credentials)),
        ("key: KeyFormat.parse + KeyHasher.digest", lambda: hasher.digest(fmt.parse(key).secret)),
        ("lookup: MemoryKeyStore.find + check_secret", lookup),
        (
            "IP allow-list: IPAllowList.from_cidrs().allows",
            lambda: IPAllowList.from_cidrs(record.ip_allow).allows(ip),
        ),
        ("scope: scope_allows", lambda: scope_allows(record.scopes, needed)),
        (
            "policy: resolve_policy",
            lambda: resolve_policy(guard.plans.get(record.plan), record.limits, needed, None),
        ),
        ("limits: MemoryRateStore.hit + release", hit_and_release),
        ("headers: limit_headers", lambda: limit_headers(states)),
    ]
    stage_sum = 0.0
    for name, fn in stages:
        result = report.add(name, measure(_repeat(fn), settings))
        # The adapters work outside Guard.check; the peek only runs for an address
        # that has failed before (Guard._blocked_for), never on this request.
        if not name.startswith(("adapter:", "  (information)")):
            stage_sum += result.us

    def check() -> None:
        decision = guard.check(request)
        if not isinstance(decision, Allow):
            raise enf.Refused(f"the guard refused: {decision}")
        if decision.lease is not None:
            guard.release(decision.lease)

    whole = report.add(
        "Guard.check + release (sync, whole decision)", measure(_repeat(check), settings)
    )
    awhole = asyncio.run(_async_whole(guard, request, settings))
    report.add("Guard.acheck + arelease (async, whole decision)", awhole)
    report.derive("sum of the stages inside Guard.check", stage_sum, "µs")
    report.derive(
        "flow overhead: Guard.check - sum of stages",
        whole.us - stage_sum,
        "µs",
        note="generators, driver, decision and identity objects",
    )
    report.derive(
        "async face overhead: acheck - check", awhole.median - whole.us, "µs", note="per request"
    )
    return report


async def _async_whole(guard: Guard, request: RequestInfo, settings: Settings) -> Timing:
    async def loop(n: int) -> None:
        for _ in range(n):
            decision = await guard.acheck(request)
            if not isinstance(decision, Allow):
                raise enf.Refused(f"the guard refused: {decision}")
            if decision.lease is not None:
                await guard.arelease(decision.lease)

    return await ameasure(loop, settings)
