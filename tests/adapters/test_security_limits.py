"""SECURITY.md C8-C10 and the C12 sweeps through the middleware: admission, slots, headers."""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from http_sfv.list import List as SfList

from keyguard.adapters.asgi import KeyGuardMiddleware, Message, Receive, Scope, Send
from keyguard.adapters.wsgi import KeyGuardWSGIMiddleware
from keyguard.backends.memory_limiter import MemoryRateStore
from keyguard.denials import Denial
from keyguard.guard import Allow, Lease
from keyguard.plans import ServiceLimits
from keyguard.ratelimit_headers import SF_INTEGER_MAX
from keyguard.request import RequestInfo
from keyguard.scopes import RouteMap, RouteRule
from tests.adapters.security_support import (
    PEER,
    Env,
    Issued,
    Reply,
    asgi_call,
    http_scope,
    sweep,
    wsgi_call,
    wsgi_environ,
)

TCHAR = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
FIELD_VALUE = re.compile(rb"[\x20-\x7e\t]*")


def key_header(issued: Issued) -> list[tuple[bytes, bytes]]:
    return [(b"x-api-key", issued.key.encode())]


def items(value: str | None) -> dict[str, dict[str, Any]]:
    """A RateLimit or RateLimit-Policy field as {name: params}, through a conforming parser."""
    parsed = SfList()
    parsed.parse((value or "").encode())
    out: dict[str, dict[str, Any]] = {}
    for item in parsed:
        assert type(item.value) is str  # an sf-String, not a Token
        assert item.value not in out  # one Item per policy
        out[item.value] = dict(item.params)
    return out


def remaining(reply: Reply, name: str) -> int:
    return int(items(reply.get("ratelimit"))[name]["r"])


# -- C8: admission ------------------------------------------------------------------------


async def test_t68_exact_admission_under_concurrency(env: Env) -> None:
    """200 simultaneous ASGI requests against 10/second on a frozen clock admit exactly 10."""
    key = env.issue(rate="10/second")
    app = KeyGuardMiddleware(env.app.asgi, guard=env.guard())
    transport = httpx.ASGITransport(app, client=(PEER, 50000))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        replies = await asyncio.gather(
            *(client.get("/", headers={"x-api-key": key.key}) for _ in range(200))
        )
    assert Counter(r.status_code for r in replies) == {200: 10, 429: 190}
    assert env.app.calls == 10


def test_t68_exact_admission_under_wsgi_threads(env: Env) -> None:
    """200 requests from 16 WSGI threads against 10/second admit exactly 10."""
    key = env.issue(rate="10/second")
    app = KeyGuardWSGIMiddleware(env.app.wsgi, guard=env.guard())
    with ThreadPoolExecutor(16) as pool:
        replies = list(
            pool.map(lambda _: wsgi_call(app, wsgi_environ(headers=key_header(key))), range(200))
        )
    assert Counter(r.status for r in replies) == {200: 10, 429: 190}


def test_t69_multi_window_atomicity(env: Env, face: str) -> None:
    """5/second and 20/minute: 100 requests a second admit 5, 5, 5, 5, 0; refusals cost nothing."""
    front = env.front(face)
    key = env.issue(rate="5/second;20/minute")
    admitted, minute_left = [], []
    for _ in range(5):
        replies = [front.raw(headers=key_header(key)) for _ in range(100)]
        ok = [r for r in replies if r.status == 200]
        admitted.append(len(ok))
        minute_left.append(remaining(ok[-1] if ok else replies[-1], "minute"))
        env.clock.advance(1)
    assert admitted == [5, 5, 5, 5, 0]
    assert minute_left == [15, 10, 5, 0, 0]


def test_t71_cost_above_capacity_has_no_retry_after(env: Env, face: str) -> None:
    """A cost above the quota itself is 429 with no Retry-After, since waiting cannot help."""
    routes = RouteMap([RouteRule("GET", "/images", "image:create")])
    guard = env.guard(routes=routes, services={"image:create": ServiceLimits(cost=10)})
    front = env.front(face, guard)
    reply = front.key(env.issue(scopes=["image:create"], quota_daily=5).key, "/images")
    assert reply.status == 429
    assert reply.get("retry-after") is None
    assert "cost exceeds capacity" in reply.error()["message"]
    assert "retry_after" not in reply.error()


@pytest.mark.parametrize(
    ("rate", "spacing"), [("3/minute", 10.0), ("1/second", 0.25), ("2/hour", 7.0)]
)
def test_t72_retry_after_is_truthful(env: Env, face: str, rate: str, spacing: float) -> None:
    """Retry-After is a whole number >= 1, not before any exhausted window's t, and then admits."""
    front = env.front(face)
    key = env.issue(rate=rate)
    while (reply := front.raw(headers=key_header(key))).status == 200:
        env.clock.advance(spacing)
    wait = reply.get("retry-after") or ""
    assert wait.isdigit()
    assert int(wait) >= 1
    exhausted = [p["t"] for p in items(reply.get("ratelimit")).values() if p["r"] == 0]
    assert exhausted
    assert all(int(wait) >= t for t in exhausted)
    assert reply.error()["retry_after"] == int(wait)
    env.clock.advance(int(wait))
    assert front.raw(headers=key_header(key)).status == 200


def test_t72_quota_and_failed_attempts_retry_after(env: Env, face: str) -> None:
    """A daily quota and the failed-attempt limiter also admit again once Retry-After has passed."""
    front = env.front(face, env.guard(auth_failures=2))
    key = env.issue(quota_daily=1)
    front.raw(headers=key_header(key))
    quota = front.raw(headers=key_header(key))
    for _ in range(3):
        blocked = front.key("kg_live_bad", client="198.51.100.9")
    assert (quota.status, blocked.status) == (429, 429)
    env.clock.advance(int(blocked.get("retry-after") or 0))
    assert front.key(key.key, client="198.51.100.9").status == 429  # the quota, not the IP
    env.clock.advance(int(quota.get("retry-after") or 0))
    assert front.raw(headers=key_header(key)).status == 200


def test_t72_failed_attempt_block_ends_when_it_says(env: Env, face: str) -> None:
    """The failed-attempt 429 never tells a client to come back before its block has ended."""
    front = env.front(face, env.guard(auth_failures=2))
    good = env.issue().key
    env.clock.advance(0.9)  # failures land mid-slot, so they leave the window after 60.1 s
    waits = []
    for n in range(20):
        for _ in range(3):
            reply = front.key("kg_live_bad", client=f"198.51.100.{n}")
        assert reply.error()["code"] == "too_many_failed_attempts"
        waits.append(int(reply.get("retry-after") or 0))
    env.clock.advance(min(waits))
    assert {front.key(good, client=f"198.51.100.{n}").status for n in range(20)} == {200}


def test_t73_ratelimit_headers_parse_as_structured_fields(env: Env, face: str) -> None:
    """On 200 and 429 both fields are sf-Lists of named Items with bounded non-negative integers."""
    front = env.front(face)
    key = env.issue(rate="2/second;100/minute;1000/hour", quota_daily=10**15, concurrency=3)
    replies = [front.raw(headers=key_header(key)) for _ in range(3)]
    assert [r.status for r in replies] == [200, 200, 429]
    for reply in replies:
        policy = items(reply.get("ratelimit-policy"))
        current = items(reply.get("ratelimit"))
        assert set(policy) == set(current) == {"second", "minute", "hour", "daily", "concurrency"}
        for params in current.values():
            assert {"r", "t"} <= set(params)
            assert all(type(params[p]) is int and 0 <= params[p] <= SF_INTEGER_MAX for p in "rt")
        assert all(0 <= p["q"] <= SF_INTEGER_MAX for p in policy.values())
        assert policy["concurrency"]["qu"] == "concurrent-requests"
    assert remaining(replies[-1], "second") == 0


# -- C9: concurrency slots ----------------------------------------------------------------


async def test_t79_handler_raises_before_start(env: Env) -> None:
    """A handler that raises before http.response.start gives its slot back."""
    key = env.issue(concurrency=2)
    held: list[int] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        held.append(env.in_flight(key.record.id))
        raise RuntimeError("the handler failed")

    middleware = KeyGuardMiddleware(app, guard=env.guard())
    with pytest.raises(RuntimeError):
        await asgi_call(middleware, http_scope(headers=key_header(key)))
    assert held == [1]
    assert env.in_flight(key.record.id) == 0


async def test_t79_handler_raises_after_start(env: Env) -> None:
    """A handler that raises after http.response.start gives its slot back."""
    key = env.issue(concurrency=2)
    sent: list[Message] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"part", "more_body": True})
        raise RuntimeError("the handler failed mid-body")

    async def send(message: Message) -> None:
        sent.append(message)

    async def receive() -> Message:
        return {"type": "http.request", "body": b""}

    middleware = KeyGuardMiddleware(app, guard=env.guard())
    with pytest.raises(RuntimeError):
        await middleware(http_scope(headers=key_header(key)), receive, send)
    assert len(sent) == 2
    assert env.in_flight(key.record.id) == 0
    assert env.limiter.releases == 1


async def test_t80_client_disconnects_mid_request(env: Env) -> None:
    """A handler that sees http.disconnect and returns without answering gives its slot back."""
    key = env.issue(concurrency=2)
    messages = iter([{"type": "http.request", "body": b"", "more_body": True}])

    async def receive() -> Message:
        return next(messages, {"type": "http.disconnect"})

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    async def send(message: Message) -> None:
        raise AssertionError("nothing is sent to a client that has gone")

    await KeyGuardMiddleware(app, guard=env.guard())(
        http_scope(headers=key_header(key)), receive, send
    )
    assert env.in_flight(key.record.id) == 0


async def test_t80_handler_cancelled_on_disconnect(env: Env) -> None:
    """When the server cancels the handler after a disconnect, the slot comes back."""
    key = env.issue(concurrency=2)
    entered = asyncio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        entered.set()
        await asyncio.Event().wait()

    middleware = KeyGuardMiddleware(app, guard=env.guard())
    task = asyncio.ensure_future(asgi_call(middleware, http_scope(headers=key_header(key))))
    await entered.wait()
    assert env.in_flight(key.record.id) == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert env.in_flight(key.record.id) == 0


async def test_t81_streaming_holds_the_slot_until_the_last_chunk(env: Env) -> None:
    """The slot is held while chunks stream and released exactly once after the last."""
    key = env.issue(concurrency=2)
    during: list[int] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for chunk in (b"a", b"b", b"c"):
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            during.append(env.in_flight(key.record.id))
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        during.append(env.in_flight(key.record.id))

    reply = await asgi_call(
        KeyGuardMiddleware(app, guard=env.guard()), http_scope(headers=key_header(key))
    )
    assert reply.body == b"abc"
    assert during == [1, 1, 1, 0]
    assert env.limiter.releases == 1


async def test_t81_send_raising_releases_the_slot(env: Env) -> None:
    """``send`` raising OSError on a closed connection releases the slot once."""
    key = env.issue(concurrency=2)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"a", "more_body": True})
        await send({"type": "http.response.body", "body": b"b", "more_body": True})

    async def send(message: Message) -> None:
        if message.get("body") == b"b":
            raise OSError("the connection is closed")

    async def receive() -> Message:
        return {"type": "http.request", "body": b""}

    with pytest.raises(OSError, match="closed"):
        await KeyGuardMiddleware(app, guard=env.guard())(
            http_scope(headers=key_header(key)), receive, send
        )
    assert env.in_flight(key.record.id) == 0
    assert env.limiter.releases == 1


async def test_t82_timeout_cancels_and_releases(env: Env) -> None:
    """An outer asyncio timeout that cancels the request releases its slot."""
    key = env.issue(concurrency=2)
    deadlines: list[asyncio.Timeout] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        deadlines[0].reschedule(asyncio.get_running_loop().time())  # expire now, in here
        await asyncio.Event().wait()

    async def call_within_deadline() -> None:
        async with asyncio.timeout(None) as deadline:
            deadlines.append(deadline)
            await asgi_call(KeyGuardMiddleware(app, guard=env.guard()), scope)

    scope = http_scope(headers=key_header(key))
    with pytest.raises(TimeoutError):
        await call_within_deadline()
    assert env.in_flight(key.record.id) == 0


async def test_t82_cancelled_during_admission(env: Env) -> None:
    """A task cancelled while its hit still runs in a worker thread does not keep the slot."""
    key = env.issue(concurrency=2)
    env.limiter.gate = threading.Event()
    middleware = KeyGuardMiddleware(env.app.asgi, guard=env.guard())
    task = asyncio.ensure_future(asgi_call(middleware, http_scope(headers=key_header(key))))
    assert await asyncio.to_thread(env.limiter.entered.wait, 5)
    task.cancel()
    await asyncio.sleep(0)
    env.limiter.gate.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await asyncio.to_thread(env.limiter.done.wait, 5)
    assert env.in_flight(key.record.id) == 0
    assert env.app.calls == 0


@pytest.mark.parametrize("ending", ["raises mid-iteration", "closed early", "app raises"])
def test_t83_wsgi_slot_released_on_close(env: Env, ending: str) -> None:
    """The WSGI slot comes back through close() however the response ends (PEP 3333)."""
    key = env.issue(concurrency=2)

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        if ending == "app raises":
            raise RuntimeError("the app failed")
        start_response("200 OK", [("content-type", "text/plain")])

        def body() -> Iterator[bytes]:
            yield b"a"
            if ending == "raises mid-iteration":
                raise RuntimeError("the body failed")
            yield from (b"b", b"c")

        return body()

    middleware = KeyGuardWSGIMiddleware(app, guard=env.guard())
    environ = wsgi_environ(headers=key_header(key))
    if ending == "app raises":
        with pytest.raises(RuntimeError):
            middleware(environ, lambda *args: None)
    else:
        result = middleware(environ, lambda *args: None)
        chunks = iter(result)
        assert next(chunks) == b"a"
        assert env.in_flight(key.record.id) == 1
        if ending == "raises mid-iteration":
            with pytest.raises(RuntimeError):
                next(chunks)
        result.close()  # type: ignore[attr-defined]
    assert env.in_flight(key.record.id) == 0
    assert env.limiter.releases == 1


def request_with(issued: Issued) -> RequestInfo:
    return RequestInfo("GET", "/", tuple(key_header(issued)), peer=PEER)


def test_t85_double_and_stray_release(env: Env) -> None:
    """Releasing twice, or a lease nobody holds, never frees more than was taken."""
    guard = env.guard()
    key = env.issue(concurrency=2)
    first = guard.check(request_with(key))
    assert isinstance(first, Allow)
    assert first.lease is not None
    for _ in range(2):
        guard.release(first.lease)
        env.run(guard.arelease(first.lease))
    guard.release(Lease(key.record.id, "never-taken"))
    guard.release(Lease("key_unknown", "never-taken"))
    assert env.in_flight(key.record.id) == 0
    decisions = [guard.check(request_with(key)) for _ in range(3)]
    assert [isinstance(d, Allow) for d in decisions] == [True, True, False]
    assert isinstance(decisions[2], Denial)
    assert decisions[2].code == "concurrency_limit_exceeded"


async def test_t85_release_after_last_chunk_and_on_exit_happens_once(env: Env) -> None:
    """A handler that finishes its body and then raises is released once, not twice."""
    key = env.issue(concurrency=2)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})
        raise RuntimeError("after the response")

    with pytest.raises(RuntimeError):
        await asgi_call(
            KeyGuardMiddleware(app, guard=env.guard()), http_scope(headers=key_header(key))
        )
    assert env.limiter.releases == 1
    assert env.in_flight(key.record.id) == 0


async def test_t86_cap_enforced_without_queueing(env: Env) -> None:
    """With a cap of 5, 50 slow requests put at most 5 in the handler and 45 get 429 at once."""
    key = env.issue(concurrency=5)
    gate, refused_all = asyncio.Event(), asyncio.Event()
    inside = peak = 0
    refused: list[Reply] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal inside, peak
        inside += 1
        peak = max(peak, inside)
        await gate.wait()
        inside -= 1
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    middleware = KeyGuardMiddleware(app, guard=env.guard())

    async def one() -> Reply:
        reply = await asgi_call(middleware, http_scope(headers=key_header(key)))
        if reply.status == 429:
            refused.append(reply)
            if len(refused) == 45:
                refused_all.set()
        return reply

    tasks = [asyncio.ensure_future(one()) for _ in range(50)]
    async with asyncio.timeout(10):
        await refused_all.wait()
    assert (inside, peak) == (5, 5)
    gate.set()
    replies = await asyncio.gather(*tasks)
    assert Counter(r.status for r in replies) == {200: 5, 429: 45}
    assert peak == 5
    for reply in refused:
        assert items(reply.get("ratelimit-policy"))["concurrency"] == {
            "q": 5,
            "qu": "concurrent-requests",
        }
        assert reply.get("retry-after") == "1"
    assert env.in_flight(key.record.id) == 0


# -- C10: memory bounds, lightly (the limiter's own tests go deep) ------------------------


def bounded(env: Env, face: str, size: int) -> tuple[Any, MemoryRateStore]:
    limiter = MemoryRateStore(clock=env.clock, max_entries=size)
    env.on_close(limiter.close)
    return env.front(face, env.guard(limiter=limiter)), limiter


def test_t87_many_keys_stay_within_max_entries(tmp_path: Path, face: str) -> None:
    """Thirty keys through a 10-entry limiter hold at most 10 buckets; idle ones make room."""
    env = Env("memory", tmp_path)
    try:
        front, limiter = bounded(env, face, 10)
        keys = [env.issue(rate="100/minute") for _ in range(30)]
        statuses = [front.key(k.key).status for k in keys]
        assert len(limiter) == 10
        assert statuses == [200] * 10 + [429] * 20
        env.clock.advance(61)
        assert front.key(keys[-1].key).status == 200
        assert len(limiter) <= 10
    finally:
        env.close()


def test_t88_flooding_the_table_does_not_reset_a_live_counter(tmp_path: Path, face: str) -> None:
    """A limited key stays limited while attackers fill the table with live buckets."""
    env = Env("memory", tmp_path)
    try:
        front, limiter = bounded(env, face, 5)
        target = env.issue(rate="2/minute")
        assert [front.key(target.key).status for _ in range(3)] == [200, 200, 429]
        for _ in range(20):
            front.key(env.issue(rate="100/minute").key)
        assert len(limiter) == 5
        assert front.key(target.key).status == 429
        env.clock.advance(60)
        assert front.key(target.key).status == 200
    finally:
        env.close()


# -- C11: the limit store failing ---------------------------------------------------------


@pytest.mark.parametrize("policy", ["deny", "allow"])
def test_t93_limit_store_down_follows_the_policy(env: Env, face: str, policy: str) -> None:
    """A failing limit store is 503 with Retry-After, or the app's answer without limit headers."""
    front = env.front(face, env.guard(on_limiter_error=policy))
    key = env.issue(rate="10/minute", concurrency=2)
    env.limiter.fail_hits = True
    reply = front.key(key.key)
    if policy == "deny":
        assert reply.status == 503
        assert reply.error()["code"] == "limiter_unavailable"
        assert int(reply.get("retry-after") or 0) >= 1
    else:
        assert reply.status == 200
        assert not [k for k, _ in reply.headers if b"ratelimit" in k]
    assert front.errors == []


def test_t93_release_failure_is_not_an_error(
    env: Env, face: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A limit store that fails when a slot is given back neither fails nor breaks the response."""
    front = env.front(face)
    key = env.issue(concurrency=2)
    env.limiter.fail_releases = True
    with caplog.at_level(logging.WARNING, logger="keyguard"):
        reply = front.key(key.key)
    assert (reply.status, reply.body) == (200, b"ok")
    assert front.errors == []
    assert env.limiter.releases == 1
    assert any("release" in r.getMessage() for r in caplog.records)


# -- C12: conformance sweeps ----------------------------------------------------------------


def test_t96_every_401_challenges(env: Env, face: str) -> None:
    """Every 401 the middleware sends carries WWW-Authenticate with at least one challenge."""
    unauthorised = [(label, r) for label, r in sweep(env, face) if r.status == 401]
    assert len(unauthorised) >= 4
    for label, reply in unauthorised:
        challenge = reply.get("www-authenticate") or ""
        assert re.match(r'Bearer realm="[^"]+"', challenge), label
        assert ', ApiKey realm="' in challenge, label


def test_t98_retry_after_on_every_429_and_503(env: Env, face: str) -> None:
    """Every 429 and 503 carries a whole-second Retry-After, except a cost above capacity."""
    busy = [(label, r) for label, r in sweep(env, face) if r.status in {429, 503}]
    assert len(busy) >= 8
    for label, reply in busy:
        wait = reply.get("retry-after")
        if label == "429 cost above capacity":
            assert wait is None
        else:
            assert wait is not None, label
            assert wait.isdigit(), label
            assert int(wait) >= 1, label


def test_t98_retry_after_is_jittered_upwards(env: Env, face: str) -> None:
    """Clients refused together are told to come back at slightly different times, never early."""
    front = env.front(face)
    key = env.issue(rate="1/hour")
    assert front.key(key.key).status == 200
    refusals = [front.key(key.key) for _ in range(40)]
    window_end = items(refusals[0].get("ratelimit"))["hour"]["t"]
    waits = {int(r.get("retry-after") or 0) for r in refusals}
    assert len(waits) > 1
    assert min(waits) >= window_end
    assert max(waits) <= window_end * 1.1


def test_t99_every_header_byte_is_legal(env: Env, face: str) -> None:
    """Every header on every response is a token name and a value free of controls."""
    replies = sweep(env, face)
    assert {r.status for _, r in replies} >= {200, 400, 401, 403, 429, 500, 503}
    for label, reply in replies:
        for name, value in reply.headers:
            assert TCHAR.fullmatch(name), (label, name)
            assert FIELD_VALUE.fullmatch(value), (label, name, value)
