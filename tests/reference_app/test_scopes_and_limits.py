"""The acceptance points: 403 without the scope, 429 past the minute window, and
units settled to the tokens used."""

from __future__ import annotations

import pytest
from reference_app.catalogue import SERVICE_SCOPES

from keyguard import load_settings

from .conftest import MakeServer, Server

IMAGE_ROUTES = (
    ("/v1/images/generations", {"prompt": "x"}),
    ("/v1/images/edits", {"image": "AAAAAAAA", "prompt": "x"}),
    ("/v1/images/style", {"image": "AAAAAAAA", "style": "x"}),
    ("/v1/images/analyze", {"image": "AAAAAAAA"}),
)


def _remaining(headers: object, name: str) -> int:
    """``r`` of one policy in the RateLimit header."""
    value = headers["ratelimit"]  # type: ignore[index]
    for item in value.split(","):
        label, *params = item.split(";")
        if label.strip('" ') == name:
            return int(dict(p.split("=") for p in params)["r"])
    raise AssertionError(f"no {name} in {value}")


def test_t48_a_key_without_image_scopes_gets_403_and_is_not_charged(server: Server) -> None:
    """Every image route refuses a text-only key with 403 insufficient_scope, uncharged."""
    key, _ = server.new_key(scopes=["text:*"], owner="t48")
    before = _remaining(
        server.call("POST", "/v1/generate", key, json={"prompt": "x"}).headers, "minute"
    )
    for path, body in IMAGE_ROUTES:
        answer = server.call("POST", path, key, json=body)
        assert answer.status_code == 403, path
        assert answer.json()["error"]["code"] == "insufficient_permissions"
        assert 'error="insufficient_scope"' in answer.headers["www-authenticate"]
        assert answer.headers["cache-control"] == "no-store"
    after = _remaining(
        server.call("POST", "/v1/generate", key, json={"prompt": "x"}).headers, "minute"
    )
    assert after == before - 1  # only the second generate counted


def test_free_plan_gets_429_with_retry_after_past_its_minute_window(server: Server) -> None:
    """60 calls a minute on the free plan; the 61st is 429 with Retry-After and limits."""
    statuses = [
        server.call("POST", "/v1/generate", server.demo, json={"prompt": "x"}).status_code
        for _ in range(60)
    ]
    assert statuses == [200] * 60
    refused = server.call("POST", "/v1/generate", server.demo, json={"prompt": "x"})
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.headers["x-ratelimit-limit"] == "60"
    assert refused.headers["x-ratelimit-remaining"] == "0"
    assert "ratelimit-policy" in refused.headers


@pytest.fixture
def metered(make_server: MakeServer) -> Server:
    """A server whose free plan has a small daily quota, so units are visible."""
    settings = load_settings(
        env_file=None, storage_url="memory://", plans={"free": {"quota_daily": 10_000}}
    )
    return make_server(settings)


def test_text_units_settle_to_the_tokens_used(metered: Server) -> None:
    """A generation admitted at one unit is settled to its total tokens."""
    first = metered.call("POST", "/v1/generate", metered.demo, json={"prompt": "a b c"})
    used = first.json()["usage"]["total_tokens"]
    start = _remaining(first.headers, "daily")
    second = metered.call("POST", "/v1/generate", metered.demo, json={"prompt": "a b c"})
    # The first settled to ``used``; the second's admission charged 1 so far.
    assert _remaining(second.headers, "daily") == start - (used - 1) - 1


def test_streamed_chat_settles_when_the_stream_ends(metered: Server) -> None:
    """The units of a stream are settled after its last event."""
    body = {
        "model": "default",
        "messages": [{"role": "user", "content": "a b c d"}],
        "stream": True,
    }
    with metered.client.stream(
        "POST", "/v1/chat/completions", json=body, headers={"X-API-Key": metered.demo}
    ) as answer:
        start = _remaining(answer.headers, "daily")
        answer.read()
    after = metered.call("POST", "/v1/generate", metered.demo, json={"prompt": "x"})
    assert _remaining(after.headers, "daily") == start - (8 - 1) - 1


def test_demo_key_holds_every_service_scope(server: Server) -> None:
    """The first-run demo key can call every service."""
    who = server.call("GET", "/v1/whoami", server.demo).json()
    assert set(SERVICE_SCOPES) <= set(who["scopes"])
    assert who["plan"] == "free"


def test_chat_reserves_max_tokens_and_is_refused_before_any_work(server: Server) -> None:
    """A key whose daily quota cannot hold the prompt and max_tokens gets 429
    quota_exceeded before the provider runs, and is charged nothing for it."""
    key, _ = server.new_key(scopes=["chat:*", "text:*"], limits={"quota_daily": 100})
    chat = {"model": "default", "messages": [{"role": "user", "content": "hi"}]}
    refused = server.call("POST", "/v1/chat/completions", key, json={**chat, "max_tokens": 500})
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "quota_exceeded"
    assert "ratelimit" in refused.headers
    ok = server.call("POST", "/v1/chat/completions", key, json={**chat, "max_tokens": 20})
    assert ok.status_code == 200, ok.text
    used = ok.json()["usage"]["total_tokens"]
    daily = _remaining(
        server.call("POST", "/v1/generate", key, json={"prompt": "x", "max_tokens": 1}).headers,
        "daily",
    )
    # The refused reservation took nothing and the answered call settled to its tokens:
    # what is left when the next call is admitted (charged 1) says so exactly.
    assert daily == 100 - used - 1
