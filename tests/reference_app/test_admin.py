"""The key API: lifecycle, plans, quota requests, and tenant isolation."""

from __future__ import annotations

from .conftest import Server


def test_key_lifecycle_through_the_admin_api(server: Server) -> None:
    """Create, read, list, update, rotate and revoke; the secret is shown only twice."""
    key, record = server.new_key(name="svc", owner="acme", scopes=["text:generate"])
    assert server.call("POST", "/v1/generate", key, json={"prompt": "x"}).status_code == 200
    read = server.call("GET", f"/v1/keys/{record['id']}", server.admin).json()
    assert read["name"] == "svc"
    assert key not in str(read)
    listed = server.call("GET", "/v1/keys?owner=acme", server.admin).json()["data"]
    assert [k["id"] for k in listed] == [record["id"]]
    changed = server.call(
        "PATCH",
        f"/v1/keys/{record['id']}",
        server.admin,
        json={"scopes": ["text:*"], "name": "svc2"},
    )
    assert changed.json()["scopes"] == ["text:*"]
    rotated = server.call(
        "POST", f"/v1/keys/{record['id']}/rotate", server.admin, json={"grace_seconds": 0}
    )
    new_key = rotated.json()["key"]
    assert new_key != key
    assert server.call("POST", "/v1/generate", key, json={"prompt": "x"}).status_code == 401
    assert server.call("POST", "/v1/generate", new_key, json={"prompt": "x"}).status_code == 200
    revoked = server.call(
        "POST", f"/v1/keys/{record['id']}/revoke", server.admin, json={"reason": "done"}
    )
    assert revoked.json()["status"] == "revoked"
    assert server.call("POST", "/v1/generate", new_key, json={"prompt": "x"}).status_code == 401


def test_plans_are_listed(server: Server) -> None:
    """Plans come from configuration, with the default marked."""
    plans = {p["name"]: p for p in server.call("GET", "/v1/plans", server.demo).json()["data"]}
    assert plans["free"]["default"] is True
    assert plans["free"]["rate"].startswith("60/minute")
    assert server.call("GET", "/v1/plans/nope", server.demo).status_code == 404


def test_self_service_sees_only_its_own_owner(server: Server) -> None:
    """A keys:self key lists and reads its owner's keys; others' are 404 as if absent."""
    mine, mine_record = server.new_key(owner="alice", scopes=["keys:self", "text:*"])
    _, sibling = server.new_key(owner="alice", scopes=["text:generate"])
    _, stranger = server.new_key(owner="bob", scopes=["text:generate"])
    listed = server.call("GET", "/v1/keys", mine).json()["data"]
    assert {k["id"] for k in listed} == {mine_record["id"], sibling["id"]}
    assert server.call("GET", "/v1/keys?owner=bob", mine).json()["data"] == []
    assert server.call("GET", f"/v1/keys/{sibling['id']}", mine).status_code == 200
    for method, path in (
        ("GET", f"/v1/keys/{stranger['id']}"),
        ("PATCH", f"/v1/keys/{stranger['id']}"),
        ("POST", f"/v1/keys/{stranger['id']}/revoke"),
        ("POST", f"/v1/keys/{stranger['id']}/rotate"),
    ):
        body = {"name": "x"} if method == "PATCH" else None
        answer = server.call(method, path, mine, json=body)
        assert answer.status_code == 404, path
        assert answer.json()["error"]["code"] == "key_not_found"
    unknown = server.call("GET", "/v1/keys/key_doesnotexist", mine)
    assert unknown.json() == server.call("GET", f"/v1/keys/{stranger['id']}", mine).json()


def test_self_service_cannot_grant_scopes_beyond_its_own(server: Server) -> None:
    """A keys:self key cannot make or widen a key past its own scopes (or to admin)."""
    mine, mine_record = server.new_key(owner="alice", scopes=["keys:self", "text:*"])
    for scopes in (["image:create"], ["admin"], ["*"], ["text:*", "audio:*"]):
        answer = server.call("POST", "/v1/keys", mine, json={"name": "x", "scopes": scopes})
        assert answer.status_code == 403, scopes
        assert answer.json()["error"]["code"] == "scope_not_grantable"
    _, record = server.new_key(mine, scopes=["text:generate"])
    assert record["owner"] == "alice"
    widen = server.call("PATCH", f"/v1/keys/{mine_record['id']}", mine, json={"scopes": ["*"]})
    assert widen.status_code == 403
    moved = server.call("POST", "/v1/keys", mine, json={"name": "x", "owner": "bob"})
    assert moved.json()["error"]["code"] == "owner_not_allowed"
    steal = server.call("PATCH", f"/v1/keys/{record['id']}", mine, json={"owner": "bob"})
    assert steal.status_code == 403


def test_self_service_cannot_grant_limits_beyond_its_own(server: Server) -> None:
    """Looser windows, quotas, concurrency or a bigger plan are refused; stricter pass."""
    mine, mine_record = server.new_key(owner="alice", scopes=["keys:self"], plan="free")
    for body in (
        {"plan": "enterprise"},
        {"limits": {"rate": "1000/minute"}},
        {"limits": {"concurrency": 50}},
        {"limits": {"quota_monthly": 10_000_000}},
    ):
        answer = server.call("POST", "/v1/keys", mine, json={"name": "x", **body})
        assert answer.status_code == 403, body
        assert answer.json()["error"]["code"] == "limits_not_grantable"
    ok = server.call(
        "POST",
        "/v1/keys",
        mine,
        json={"name": "x", "limits": {"rate": "10/minute;100/hour;1000/day", "concurrency": 1}},
    )
    assert ok.status_code == 201, ok.text
    raise_own = server.call(
        "PATCH", f"/v1/keys/{mine_record['id']}", mine, json={"limits": {"rate": "9999/minute"}}
    )
    assert raise_own.status_code == 403


def test_a_key_without_keys_self_cannot_use_the_key_api(server: Server) -> None:
    """The key API needs keys:self: a service-only key gets 403 before anything runs."""
    key, _ = server.new_key(owner="alice", scopes=["text:*"])
    answer = server.call("GET", "/v1/keys", key)
    assert answer.status_code == 403
    assert answer.json()["error"]["scope"] == "keys:self"


def test_quota_request_approved_changes_the_keys_limits(server: Server) -> None:
    """A key asks, an admin approves, and the key's limits change; a decline does not."""
    mine, record = server.new_key(owner="alice", scopes=["keys:self", "text:*"])
    asked = server.call(
        "POST",
        "/v1/quota-requests",
        mine,
        json={"limits": {"rate": "120/minute"}, "reason": "launch"},
    )
    assert asked.status_code == 201, asked.text
    request_id = asked.json()["id"]
    refused = server.call("POST", f"/v1/quota-requests/{request_id}/approve", mine)
    assert refused.status_code == 403
    listed = server.call("GET", "/v1/quota-requests?status=pending", server.admin).json()["data"]
    assert [r["id"] for r in listed] == [request_id]
    approved = server.call(
        "POST", f"/v1/quota-requests/{request_id}/approve", server.admin, json={"note": "ok"}
    )
    assert approved.json()["status"] == "approved"
    assert (
        server.call("GET", f"/v1/keys/{record['id']}", mine).json()["limits"]["rate"]
        == "120/minute"
    )
    again = server.call("POST", f"/v1/quota-requests/{request_id}/decline", server.admin)
    assert again.status_code == 409
    headers = server.call("POST", "/v1/generate", mine, json={"prompt": "x"}).headers
    assert headers["x-ratelimit-limit"] == "120"


def test_quota_requests_are_tenant_scoped(server: Server) -> None:
    """A tenant sees its own quota requests only, and cannot ask for another's key."""
    alice, _ = server.new_key(owner="alice", scopes=["keys:self"])
    bob, bob_record = server.new_key(owner="bob", scopes=["keys:self"])
    made = server.call("POST", "/v1/quota-requests", alice, json={"limits": {"concurrency": 9}})
    assert made.status_code == 201
    assert server.call("GET", "/v1/quota-requests", bob).json()["data"] == []
    assert server.call("GET", f"/v1/quota-requests/{made.json()['id']}", bob).status_code == 404
    cross = server.call(
        "POST",
        "/v1/quota-requests",
        alice,
        json={"key_id": bob_record["id"], "limits": {"concurrency": 9}},
    )
    assert cross.status_code == 404
    empty = server.call("POST", "/v1/quota-requests", alice, json={"limits": {}})
    assert empty.status_code == 400


def test_t60_the_secret_is_in_no_listing_or_audit(server: Server) -> None:
    """A key's secret appears only in its create answer: never in reads or listings."""
    key, record = server.new_key(owner="canary", scopes=["text:generate"])
    for path in ("/v1/keys", f"/v1/keys/{record['id']}", "/v1/keys?owner=canary"):
        assert key not in server.call("GET", path, server.admin).text
    assert key[8:] not in server.call("GET", "/v1/whoami", server.demo).text


def test_an_expiry_can_be_set_and_cleared(server: Server) -> None:
    _, record = server.new_key(name="temp", owner="acme", expires_in="7d")
    path = f"/v1/keys/{record['id']}"
    assert server.call("GET", path, server.admin).json()["expires_at"] is not None
    later = server.call("PATCH", path, server.admin, json={"expires_in": "30d"}).json()
    assert later["expires_at"] > record["expires_at"]
    cleared = server.call("PATCH", path, server.admin, json={"never_expires": True})
    assert cleared.status_code == 200
    assert cleared.json()["expires_at"] is None
    both = server.call(
        "PATCH", path, server.admin, json={"never_expires": True, "expires_in": "1d"}
    )
    assert both.status_code == 400
    assert both.json()["error"]["param"] == "never_expires"
