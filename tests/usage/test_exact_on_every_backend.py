"""A scripted load, recorded by two "processes" into one store, reads back exactly.

Each process is a guard with its own recorder (its own aggregation and flushes),
in front of the same WSGI app; both write to one usage store of each backend. The
script mixes services, statuses, refusals and units from a fixed seed; the summary
must equal what was sent, count for count, on memory, SQLite, Redis and Redis Cluster.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.backends.test_usagestore_contract import open_usage_backend

from keyguard.adapters.wsgi import KeyGuardWSGIMiddleware
from keyguard.backends.memory import MemoryKeyStore
from keyguard.backends.memory_limiter import MemoryRateStore
from keyguard.guard import Guard
from keyguard.manager import KeyManager
from keyguard.plans import Plan
from keyguard.scopes import RouteMap, RouteRule
from keyguard.testing import FakeClock
from keyguard.usage.recorder import UsageRecorder
from keyguard.usage.store import UsageBackend
from keyguard.usage.summary import UsageQuery, UsageReader

T0 = 1_798_761_600.0
RULES = (
    RouteRule("POST", "/v1/generate", "text:generate"),
    RouteRule("POST", "/v1/images", "image:create"),
)
PLAN = Plan("script", rate="200/minute", quota_daily=10_000)  # the script sends 240 a minute
WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """Answers with the status the script asks for in ``X-Status``."""
    status = environ.get("HTTP_X_STATUS", "200")
    start_response(f"{status} Scripted", [("Content-Type", "text/plain")])
    return [b"ok"]


@pytest.fixture(
    params=[
        "memory",
        "sqlite",
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("redis-cluster", marks=pytest.mark.redis),
    ]
)
def usage_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[UsageBackend]:
    """A fresh store of each backend, opened as the usage-store contract opens them."""
    store = open_usage_backend(request.param, request, tmp_path)
    yield store
    store.close()


def call(app: WSGIApp, method: str, path: str, headers: dict[str, str]) -> int:
    environ: dict[str, Any] = {
        "REQUEST_METHOD": method,
        "PATH_INFO": path,
        "QUERY_STRING": "",
        "REMOTE_ADDR": "198.51.100.4",
        "wsgi.url_scheme": "http",
    }
    for name, value in headers.items():
        environ["HTTP_" + name.upper().replace("-", "_")] = value
    seen: list[str] = []

    def start_response(status: str, _headers: object, _exc: object = None) -> None:
        seen.append(status)

    body = app(environ, start_response)
    close = getattr(body, "close", None)
    b"".join(body)
    if close is not None:
        close()
    return int(seen[0].split()[0])


def test_scripted_load_sums_exactly(usage_store: UsageBackend) -> None:
    clock = FakeClock(T0)
    keys = MemoryKeyStore()
    manager = KeyManager(keys, clock=clock)
    limiter = MemoryRateStore(clock=clock)
    scopes = ("text:generate", "image:create")
    issued = manager.create("script", scopes=scopes, plan="script", owner="acme")
    other = manager.create("no images", scopes=("text:generate",), plan="script", owner="acme")
    recorders = [UsageRecorder(usage_store, clock=clock) for _ in range(2)]
    apps = [
        KeyGuardWSGIMiddleware(
            app,
            guard=Guard(
                keys=keys,
                limiter=limiter,
                routes=RouteMap(RULES),
                plans={"script": PLAN},
                clock=clock,
                usage=recorder,
            ),
        )
        for recorder in recorders
    ]
    rng = random.Random(20261206)
    expected: Counter[str] = Counter()
    services: Counter[str] = Counter()
    for n in range(600):
        clock.advance(0.25)  # 150 s: three minutes of rows
        worker = apps[n % 2]
        key = other if rng.random() < 0.1 else issued
        path = rng.choice(["/v1/generate", "/v1/images"])
        status = rng.choice(["200", "200", "200", "201", "404", "500"])
        got = call(worker, "POST", path, {"X-API-Key": key.key.reveal(), "X-Status": status})
        if key is other:  # the owner's second key: counted for the owner, refused images
            expected["other"] += 1
            if path == "/v1/images":
                assert got == 403
                expected["other_denied"] += 1
            continue
        services[path] += 1
        expected["requests"] += 1
        expected[f"{got // 100}xx"] += 1
        if got == 429:
            expected["denied"] += 1
        else:
            expected["units"] += 1
        if got >= 400:
            expected["errors"] += 1
        if n % 97 == 0:
            recorders[n % 2].flush()  # flushes land mid-script, from either process
    for recorder in recorders:
        recorder.close()

    reader = UsageReader(usage_store, clock=FakeClock(clock.now()))
    summary = reader.summary(UsageQuery(key_id=issued.record.id, since="10m", by_service=True))
    total = summary.total
    assert total.requests == expected["requests"]
    assert total.errors == expected["errors"]
    assert total.denied == expected["denied"] > 0
    assert total.units == expected["units"]
    assert total.statuses == {k: v for k, v in expected.items() if k.endswith("xx")}
    assert summary.by_service["text:generate"].requests == services["/v1/generate"]
    assert summary.by_service["image:create"].requests == services["/v1/images"]
    assert sum(total.latency.values()) == expected["requests"]
    minutes = summary.series["*"]
    assert sum(p.counts.requests for p in minutes) == expected["requests"]
    hourly = reader.summary(UsageQuery(key_id=issued.record.id, since="10m", granularity="hour"))
    assert hourly.total.requests == expected["requests"]
    daily = reader.summary(UsageQuery(owner="acme", since="10m", granularity="day"))
    assert daily.total.requests == expected["requests"] + expected["other"]
    assert daily.total.reasons.get("insufficient_permissions") == expected["other_denied"]
    errors = reader.errors(issued.record.id, limit=1000)
    assert len(errors) == 100  # the default error log size
    assert all(e.status >= 400 for e in errors)
