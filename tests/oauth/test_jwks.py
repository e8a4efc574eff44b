"""RemoteJWKS against a real local server: single flight, cooldown, bounds, no blocking."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

import pytest

from keyguard.oauth.jwks import RemoteJWKS
from keyguard.testing import FakeClock
from tests.oauth.support import Keys, StubServer


def source(server: StubServer, clock: FakeClock | None = None, **options: Any) -> RemoteJWKS:
    return RemoteJWKS(server.url + "/jwks", clock=clock or FakeClock(), timeout=0.3, **options)


def test_concurrent_async_misses_share_one_fetch(idp: StubServer) -> None:
    """A hundred coroutines refreshing at once cause one fetch, and all get the set."""
    jwks = source(idp)

    async def all_at_once() -> list[object]:
        return list(await asyncio.gather(*(jwks.arefresh() for _ in range(100))))

    results = asyncio.run(all_at_once())
    assert idp.hits == 1 == jwks.fetches
    assert all(r is not None for r in results)


def test_concurrent_sync_misses_share_one_fetch(idp: StubServer, keys: Keys) -> None:
    """Threads that miss while a slow fetch runs wait for it instead of fetching again."""
    idp.behaviour.mode, idp.behaviour.delay = "slow", 0.1
    idp.behaviour.document = keys.jwks()
    jwks = source(idp)
    results: list[object] = []
    threads = [threading.Thread(target=lambda: results.append(jwks.refresh())) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    assert idp.hits == 1
    assert len(results) == 8
    assert all(r is not None for r in results)


def test_the_async_fetch_never_blocks_the_event_loop(idp: StubServer, keys: Keys) -> None:
    """While a slow fetch is awaited, other tasks on the loop keep running (T35 p99)."""
    idp.behaviour.mode, idp.behaviour.delay = "slow", 0.2
    idp.behaviour.document = keys.jwks()
    jwks = source(idp)

    async def fetch_while_ticking() -> int:
        ticks = 0
        done = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not done.is_set():
                ticks += 1
                await asyncio.sleep(0.01)

        task = asyncio.create_task(ticker())
        await jwks.arefresh()
        done.set()
        await task
        return ticks

    assert asyncio.run(fetch_while_ticking()) >= 10


@pytest.mark.parametrize("face", ["sync", "async"])
def test_a_slow_endpoint_is_cut_off_at_the_timeout(idp: StubServer, face: str) -> None:
    """A JWKS that answers after 1 s costs at most about the 0.3 s timeout (twice, sync)."""
    idp.behaviour.mode, idp.behaviour.delay = "slow", 1.0
    jwks = source(idp)
    started = time.monotonic()
    result = jwks.refresh() if face == "sync" else asyncio.run(jwks.arefresh())
    assert result is None
    assert time.monotonic() - started < 0.7


@pytest.mark.parametrize("mode", ["500", "junk", "empty", "huge", "slow"])
def test_a_failed_fetch_is_logged_without_the_body(
    idp: StubServer, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Each failure is one warning naming the URL and a fixed reason, nothing the
    server sent; and nothing is loaded."""
    idp.behaviour.mode = mode
    jwks = source(idp)
    with caplog.at_level(logging.WARNING, logger="keyguard"):
        assert jwks.refresh() is None
    (record,) = [r for r in caplog.records if r.name == "keyguard"]
    assert idp.url in record.getMessage()
    assert "not json" not in record.getMessage()
    assert jwks.keys() is None


def test_retry_after_counts_down_the_cooldown(idp: StubServer) -> None:
    """A 503 advertises when the next fetch may happen."""
    idp.behaviour.mode = "500"
    clock = FakeClock()
    jwks = source(idp, clock)
    assert jwks.retry_after() == 1.0
    jwks.refresh()
    assert jwks.retry_after() == 30.0
    clock.advance(20)
    assert jwks.retry_after() == 10.0
    assert not jwks.may_refresh()
    clock.advance(10)
    assert jwks.may_refresh()


def test_scheduled_refresh_and_staleness(idp: StubServer) -> None:
    """A set is refreshed after max_age and dropped after max_stale without success."""
    clock = FakeClock()
    jwks = source(idp, clock, max_age=60, max_stale=120)
    assert jwks.needs_refresh()
    assert jwks.refresh() is not None
    assert not jwks.needs_refresh()
    clock.advance(61)
    assert jwks.needs_refresh()
    idp.behaviour.mode = "500"
    assert jwks.refresh() is not None  # the last good set, kept
    clock.advance(60)
    assert jwks.keys() is None
    assert "RemoteJWKS" in repr(jwks)
