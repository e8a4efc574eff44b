"""Usage through every flavour: a scripted load reads back exactly as it was sent.

Each flavour records to an in-memory store on the world's fake clock; what the
summary says (requests, errors, refusals, units, statuses, services) must equal what
the script sent, request for request. No key, credential or query value reaches a
usage row or the error log.
"""

from __future__ import annotations

import pytest

from keyguard.plans import Plan
from keyguard.testing import FakeClock
from keyguard.usage.records import Granularity, RowQuery
from keyguard.usage.summary import UsageQuery, UsageReader
from tests.adapters.clients import CLIENT_IP, Harness, MakeHarness
from tests.adapters.flavours import FLAVOURS

PLAN = Plan("test", rate="6/minute")


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_scripted_load_reads_back_exactly(make_harness: MakeHarness, flavour: str) -> None:
    harness = make_harness(flavour, plan=PLAN)
    world = harness.world
    store = world.record_usage()
    harness = Harness(flavour, world)  # built again: its guard now records usage
    secret, key_id = world.key("text:generate")
    auth = {"X-API-Key": secret, "X-Request-ID": "script-1"}
    sent = []
    sent += [harness.request("POST", "/v1/generate", auth).status_code for _ in range(3)]
    sent.append(harness.request("GET", "/v1/images", auth).status_code)  # 403: no image scope
    sent.append(harness.request("GET", "/v1/boom", auth).status_code)  # the handler raises
    sent.append(harness.request("GET", "/v1/stream", auth).status_code)
    sent += [harness.request("POST", "/v1/generate", auth).status_code for _ in range(2)]
    sent.append(harness.request("GET", "/health").status_code)  # public: nobody to count
    sent.append(harness.request("POST", "/v1/generate", {"X-API-Key": "kg_live_bad"}).status_code)
    assert sent == [200, 200, 200, 403, 500, 200, 200, 429, 200, 401]  # 6 a minute
    assert world.usage is not None
    world.usage.flush()

    summary = UsageReader(store, clock=FakeClock(world.clock.now())).summary(
        UsageQuery(key_id=key_id, since="1h", by_service=True)
    )
    total = summary.total
    assert total.requests == 8
    assert (total.errors, total.denied) == (3, 2)
    assert total.statuses == {"2xx": 5, "4xx": 2, "5xx": 1}
    assert total.reasons == {"insufficient_permissions": 1, "rate_limit_exceeded": 1}
    assert total.units == 6  # one per admitted request; refusals charge nothing
    assert summary.by_service["text:generate"].requests == 5
    assert summary.by_service["image:create"].requests == 1
    assert summary.by_service[""].requests == 2  # /v1/boom and /v1/stream need no scope

    log = UsageReader(store).errors(key_id)
    assert [e.code for e in log] == ["rate_limit_exceeded", "http_500", "insufficient_permissions"]
    assert {e.request_id for e in log} == {"script-1"}
    assert log[0].route == "/v1/generate"
    rows = store.rows(RowQuery(Granularity.MINUTE, 0, 2**40))
    stored = repr(rows) + repr(log)
    assert secret not in stored
    assert secret[-8:] not in stored
    assert CLIENT_IP not in repr(rows)  # rows hold counts, not addresses
    harness.close()


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_key_from_the_query_never_reaches_usage(make_harness: MakeHarness, flavour: str) -> None:
    harness = make_harness(flavour, plan=PLAN)
    world = harness.world
    store = world.record_usage()
    harness = Harness(flavour, world)
    secret, key_id = world.key("text:generate")
    response = harness.request("POST", f"/v1/generate?api_key={secret}&x=1", {"X-API-Key": secret})
    assert response.status_code in {200, 400}
    assert world.usage is not None
    world.usage.flush()
    everything = repr(store.rows(RowQuery(Granularity.MINUTE, 0, 2**40))) + repr(
        store.errors(key_id)
    )
    assert secret not in everything
    assert "api_key=" not in everything
    harness.close()
