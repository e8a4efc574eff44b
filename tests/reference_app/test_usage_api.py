"""The usage API: a key's usage, errors and live limits; tenant isolation; bad ranges."""

from __future__ import annotations

from typing import Any

from tests.reference_app.conftest import Server

from keyguard import Guard

GENERATE = {"prompt": "one two three", "max_tokens": 8}


def flush(server: Server) -> None:
    guard: Guard = server.client.app.state.guard  # type: ignore[attr-defined]
    assert guard.usage is not None
    guard.usage.flush()


def load(server: Server, key: str) -> None:
    for _ in range(3):
        assert server.call("POST", "/v1/generate", key, json=GENERATE).status_code == 200
    answer = server.call("POST", "/v1/images/generations", key, json={"prompt": "x"})
    assert answer.status_code in {200, 403}
    bad = server.call("POST", "/v1/generate", key, json={"prompt": ""})
    assert bad.status_code == 400


def test_a_keys_usage_counts_what_it_did(server: Server) -> None:
    key, record = server.new_key(scopes=["text:generate", "keys:self"], owner="acme")
    load(server, key)
    flush(server)
    answer = server.call("GET", f"/v1/keys/{record['id']}/usage?since=1h&by=service", key)
    assert answer.status_code == 200, answer.text
    usage: dict[str, Any] = answer.json()
    total = usage["total"]
    assert total["requests"] == 5  # 3 generations, 1 image refused (403), 1 bad body
    assert total["errors"] == 2
    assert total["denied"] == 1
    assert total["reasons"] == {"insufficient_permissions": 1}
    assert usage["by_service"]["text:generate"]["requests"] == 4
    assert usage["granularity"] == "minute"
    assert {"*", "text:generate"} <= set(usage["series"])
    assert total["latency_ms"]["p99"] is not None
    names = {limit["name"] for limit in usage["limits"]}
    assert "minute" in names
    minute = next(limit for limit in usage["limits"] if limit["name"] == "minute")
    assert minute["used"] == 5  # 4 admitted (the image refusal charged nothing) + this call
    assert key not in answer.text


def test_a_keys_error_log(server: Server) -> None:
    key, record = server.new_key(scopes=["text:generate", "keys:self"], owner="acme")
    load(server, key)
    flush(server)
    answer = server.call("GET", f"/v1/keys/{record['id']}/errors?limit=10", key)
    assert answer.status_code == 200
    codes = [e["code"] for e in answer.json()["errors"]]
    assert codes == ["http_400", "insufficient_permissions"]
    assert key not in answer.text


def test_usage_is_tenant_scoped(server: Server) -> None:
    """A keys:self key reads its own owner's usage only; another owner's key is 404."""
    mine, my_record = server.new_key(scopes=["text:generate", "keys:self"], owner="acme")
    theirs, their_record = server.new_key(scopes=["text:generate", "keys:self"], owner="globex")
    load(server, mine)
    load(server, theirs)
    flush(server)
    for path in ("usage", "errors"):
        answer = server.call("GET", f"/v1/keys/{their_record['id']}/{path}", mine)
        assert answer.status_code == 404
        assert answer.json()["error"]["code"] == "key_not_found"
    overall = server.call("GET", "/v1/usage?since=1h", mine)
    assert overall.status_code == 200
    assert overall.json()["owner"] == "acme"
    assert overall.json()["total"]["requests"] == 5
    assert server.call("GET", "/v1/usage?owner=globex", mine).status_code == 403
    admin = server.call("GET", "/v1/usage?since=1h", server.admin).json()
    assert admin["total"]["requests"] >= 10
    by_owner = server.call("GET", "/v1/usage?since=1h&owner=globex", server.admin).json()
    assert by_owner["total"]["requests"] == 5
    assert server.call("GET", f"/v1/keys/{my_record['id']}/usage", server.admin).status_code == 200


def test_bad_ranges_get_a_400_naming_the_field(server: Server) -> None:
    key, record = server.new_key(scopes=["keys:self"], owner="acme")
    for query, param in (
        ("since=yesterday", "since"),
        ("since=30d&granularity=minute", "since"),
        ("granularity=week", "granularity"),
        ("since=1h&until=2h", "since"),
    ):
        answer = server.call("GET", f"/v1/keys/{record['id']}/usage?{query}", key)
        assert answer.status_code == 400, query
        assert answer.json()["error"]["param"].endswith(param)
    assert server.call("GET", f"/v1/keys/{record['id']}/errors?limit=0", key).status_code == 400
