"""The dashboard's files and the alert-settings API it calls, in process (no browser).

The browser tests (``test_dashboard_browser.py``) drive the page itself; these pin
what a browser cannot be trusted to report: the security headers, the file
allow-list, and the tenant rules of ``/v1/alerts``.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from reference_app.dashboard import ASSETS, CSP

from .conftest import Server

HOOK = "https://hooks.example.invalid/keyguard"


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_the_page_is_public_and_sends_strict_headers(server: Server) -> None:
    """/dashboard needs no key and carries the CSP, nosniff, no-referrer and no-store."""
    page = server.call("GET", "/dashboard")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"] == CSP
    assert "default-src 'self'" in CSP
    assert "unsafe-inline" not in CSP
    assert "unsafe-eval" not in CSP
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["referrer-policy"] == "no-referrer"
    assert page.headers["cache-control"] == "no-store"
    assert page.headers["x-frame-options"] == "DENY"
    assert server.call("HEAD", "/dashboard").status_code == 200


def test_the_page_has_no_inline_script_or_style_and_no_other_origin() -> None:
    """Every script and stylesheet is a file of the package, referenced by path."""
    html = (ASSETS / "index.html").read_text()
    assert "<style" not in html
    assert " style=" not in html
    assert not re.findall(r"<[^>]*\son[a-z]+\s*=", html)  # no inline event handlers
    for tag in re.findall(r"<script[^>]*>", html):
        assert 'src="/dashboard/' in tag
    every = "".join(p.read_text() for p in Path(ASSETS).iterdir())
    assert "http://" not in every.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in every.replace("https://example.com", "")
    assert "innerHTML" not in every
    assert "eval(" not in every


@pytest.mark.parametrize("name", ["app.js", "api.js", "charts.js", "style.css", "favicon.svg"])
def test_assets_are_served_with_their_type_and_revalidated(server: Server, name: str) -> None:
    """Each file answers with a real content type, nosniff and an ETag that gives 304."""
    answer = server.call("GET", f"/dashboard/{name}")
    assert answer.status_code == 200
    kind = {"js": "text/javascript", "css": "text/css", "svg": "image/svg+xml"}
    assert answer.headers["content-type"].startswith(kind[name.rsplit(".", 1)[1]])
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert answer.headers["cache-control"] == "no-cache"
    again = server.call(
        "GET", f"/dashboard/{name}", headers={"If-None-Match": answer.headers["etag"]}
    )
    assert again.status_code == 304


@pytest.mark.parametrize(
    "path", ["/dashboard/nope.js", "/dashboard/..%2Fapp.py", "/dashboard/%2e%2e", "/dashboard/x/y"]
)
def test_only_the_packaged_files_are_served(server: Server, path: str) -> None:
    """A name outside the allow-list is 404: no path reaches the file system."""
    assert server.call("GET", path).status_code in (400, 404)


def test_the_trailing_slash_redirects_to_the_page(server: Server) -> None:
    """/dashboard/ goes to /dashboard, so relative bookmarks still work."""
    answer = server.client.get("/dashboard/", follow_redirects=False)
    assert answer.status_code == 308
    assert answer.headers["location"] == "/dashboard"


def test_the_api_the_page_calls_still_needs_a_key(server: Server) -> None:
    """Only the page is public: the data behind it is the guarded /v1 API."""
    assert server.call("GET", "/v1/keys").status_code == 401
    assert server.call("GET", "/v1/alerts/settings").status_code == 401


def test_alert_settings_round_trip_and_the_secret_is_shown_once(server: Server) -> None:
    """A webhook without a secret gets one, shown in that answer only, and kept later."""
    admin = _bearer(server.admin)
    body = {
        "webhooks": [{"url": HOOK, "kinds": ["quota.threshold", "key.revoked"]}],
        "rules": {"quota_thresholds": [0.5, 0.9], "expiry_days": [3]},
    }
    saved = server.call("PUT", "/v1/alerts/settings?owner=alice", headers=admin, json=body)
    assert saved.status_code == 200, saved.text
    made = saved.json()["new_secrets"]
    assert len(made) == 1
    assert made[0]["secret"].startswith("whsec_")
    assert saved.json()["webhooks"][0]["kinds"] == ["key.revoked", "quota.threshold"]
    read = server.call("GET", "/v1/alerts/settings?owner=alice", headers=admin).json()
    assert made[0]["secret"] not in str(read)
    assert read["new_secrets"] == []
    assert read["rules"] == {"quota_thresholds": [0.5, 0.9], "expiry_days": [3.0]}
    assert read["webhooks"][0] == {
        "url": HOOK,
        "target": "https://hooks.example.invalid",
        "kinds": ["key.revoked", "quota.threshold"],
        "secret_set": True,
    }
    again = server.call("PUT", "/v1/alerts/settings?owner=alice", headers=admin, json=body)
    assert again.json()["new_secrets"] == []  # same URL: the secret is kept
    hooks = server.client.app.state.alerts.owners.get("alice").webhooks  # type: ignore[attr-defined]
    assert hooks[0].secret == made[0]["secret"]


def test_rules_null_means_the_server_defaults(server: Server) -> None:
    """Saving ``rules: null`` drops the owner's thresholds for the global ones."""
    admin = _bearer(server.admin)
    saved = server.call(
        "PUT", "/v1/alerts/settings?owner=bob", headers=admin, json={"rules": None}
    ).json()
    assert saved["rules"] is None
    assert saved["defaults"]["quota_thresholds"] == [0.8, 1.0]


@pytest.mark.parametrize(
    ("url", "secret"),
    [
        ("http://127.0.0.1/hook", None),
        ("http://169.254.169.254/latest", None),
        ("https://localhost/x", None),
        ("ftp://example.com/x", None),
        ("https://user:pw@example.com/x", None),
        (HOOK, "short"),
    ],
)
def test_unsafe_webhooks_are_refused(server: Server, url: str, secret: str | None) -> None:
    """Private addresses, other schemes, credentials in the URL, short secrets: 400."""
    hook: dict[str, object] = {"url": url}
    if secret is not None:
        hook["secret"] = secret
    answer = server.call(
        "PUT", "/v1/alerts/settings", headers=_bearer(server.demo), json={"webhooks": [hook]}
    )
    assert answer.status_code == 400
    assert url not in answer.text


def test_a_self_service_key_reaches_only_its_own_owner(server: Server) -> None:
    """keys:self: its owner by default, another owner 403, and no key ids of others."""
    admin, demo = _bearer(server.admin), _bearer(server.demo)
    server.call(
        "PUT",
        "/v1/alerts/settings?owner=alice",
        headers=admin,
        json={"webhooks": [{"url": HOOK}]},
    )
    mine = server.call("GET", "/v1/alerts/settings", headers=demo)
    assert mine.status_code == 200
    assert mine.json()["owner"] == "demo"
    for method, path in [
        ("GET", "/v1/alerts/settings?owner=alice"),
        ("PUT", "/v1/alerts/settings?owner=alice"),
        ("GET", "/v1/alerts/deliveries?owner=alice"),
    ]:
        body: dict[str, object] | None = {"webhooks": []} if method == "PUT" else None
        answer = server.call(method, path, headers=demo, json=body)
        assert answer.status_code == 403, (method, path)
        assert HOOK not in answer.text
    assert server.call("GET", "/v1/alerts/deliveries", headers=demo).json()["owner"] == "demo"
    still = server.call("GET", "/v1/alerts/settings?owner=alice", headers=admin).json()
    assert still["webhooks"][0]["url"] == HOOK


def test_a_key_without_an_owner_has_no_alert_settings(server: Server) -> None:
    """No owner, nothing to configure: 400 owner_required."""
    key, _ = server.new_key(name="lonely", scopes=["keys:self"])
    answer = server.call("GET", "/v1/alerts/settings", headers=_bearer(key))
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "owner_required"


def test_deliveries_are_recorded_for_an_owner_webhook(server: Server) -> None:
    """A revocation alert for alice's key reaches her webhook's history (failing here:
    the receiver's name does not resolve), shown by scheme and host only."""
    admin = _bearer(server.admin)
    server.call(
        "PUT",
        "/v1/alerts/settings?owner=alice",
        headers=admin,
        json={"webhooks": [{"url": HOOK + "/token-in-path", "kinds": ["key.revoked"]}]},
    )
    _, record = server.new_key(name="a", owner="alice")
    server.call("POST", f"/v1/keys/{record['id']}/revoke", headers=admin, json={"reason": "t"})
    deadline = time.monotonic() + 10
    while True:  # the first attempt fails at once; retries would take seconds more
        page = server.call("GET", "/v1/alerts/deliveries?owner=alice", headers=admin).json()
        if page["data"] and page["data"][0]["attempts"] >= 1:
            break
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert page["owner"] == "alice"
    [delivery] = page["data"]
    assert delivery["kind"] == "key.revoked"
    assert delivery["key_id"] == record["id"]
    assert delivery["target"] == "https://hooks.example.invalid"
    assert delivery["status"] in ("pending", "failed")
    assert delivery["http_status"] is None
    assert delivery["error"]
    assert "token-in-path" not in str(page)
