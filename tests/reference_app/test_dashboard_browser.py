"""The dashboard in headless Chromium against the real server process.

One journey per kind of user, as a person would click it: the admin signs in,
generates a key, copies it, the key calls an AI route, the call shows up in the
usage chart, alerts are configured, the key is rotated and revoked and is then
refused; a self-service user, keyboard only and at phone width, sees and reaches
only its own owner's keys. Every request the page sends is recorded: all go to the
server's origin, and no revealed secret is ever in one.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .browser_support import (
    LiveServer,
    Recorder,
    browser,  # noqa: F401  (a fixture)
    live_server,  # noqa: F401  (a fixture)
    screenshot,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

HOOK = "https://hooks.example.invalid/keyguard"
PEEK = """() => [
    document.documentElement.outerHTML,
    document.body.innerText,
    ...[...document.querySelectorAll('input, textarea')].map((el) => el.value),
    JSON.stringify(sessionStorage),
    JSON.stringify(localStorage),
].join('\\n')"""

# Test instrumentation (not the app): keep a copy of every answer the page's own
# code reads from the server, to check what a self-service key was ever shown.
KEEP_BODIES = """
window.__bodies = [];
const realFetch = window.fetch.bind(window);
window.fetch = async (...args) => {
    const response = await realFetch(...args);
    response.clone().text().then((text) => window.__bodies.push(text));
    return response;
};
"""


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


def _page(chromium: Browser, server: LiveServer, recorder: Recorder, **options: object) -> Page:
    context = chromium.new_context(**options)  # type: ignore[arg-type]
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.base)
    page = context.new_page()
    page.set_default_timeout(10_000)
    recorder.attach(page)
    return page


@pytest.fixture
def admin_page(
    browser: Browser,  # noqa: F811
    live_server: LiveServer,  # noqa: F811
    recorder: Recorder,
) -> Iterator[Page]:
    page = _page(browser, live_server, recorder, viewport={"width": 1200, "height": 820})
    yield page
    page.context.close()


def _sign_in(page: Page, server: LiveServer, key: str) -> None:
    page.goto(server.base + "/dashboard")
    page.fill("#signin-key", key)
    page.press("#signin-key", "Enter")
    page.wait_for_selector("#keys-body tr[data-key]")


def _take_secret(page: Page) -> str:
    """Read the revealed secret, copy it with the button, check the clipboard, dismiss."""
    page.wait_for_selector("#dlg-reveal[open]")
    secret = page.input_value("#reveal-value")
    page.click("#reveal-copy")
    page.wait_for_selector("#reveal-copied:has-text('Copied')")
    assert page.evaluate("navigator.clipboard.readText()") == secret
    page.click("#reveal-done")
    page.wait_for_selector("#dlg-reveal", state="hidden")
    assert secret not in page.evaluate(PEEK)
    return secret


def _row(page: Page, name: str) -> str:
    return f"#keys-body tr:has(td.col-name strong:text-is('{name}'))"


def _wait_for_calls(page: Page, at_least: int) -> None:
    deadline = time.monotonic() + 15
    while True:
        total = page.evaluate("document.querySelector('#chart-calls svg')?.dataset.total")
        if total is not None and int(total) >= at_least:
            return
        assert time.monotonic() < deadline, f"the chart shows {total} calls"
        page.wait_for_timeout(400)  # usage is flushed about once a second
        page.click("#usage-refresh")


def test_admin_journey(
    admin_page: Page,
    live_server: LiveServer,  # noqa: F811
    recorder: Recorder,
    tmp_path: Path,
) -> None:
    """Sign in, generate and copy a key, see its call in the chart, set alerts, rotate,
    revoke, and watch the server refuse it; nothing leaves the origin or leaks."""
    page, server = admin_page, live_server
    _sign_in(page, server, server.admin)
    assert page.locator(_row(page, "demo")).count() == 1
    assert page.inner_text("#who-role") == "admin: every owner"
    screenshot(page, "keys", tmp_path)

    page.click("#key-new")
    page.fill("#key-name", "web-app")
    page.fill("#key-owner", "alice")
    page.check("#scope-text-all")
    page.check("#scope-chat-completions")
    page.fill("#key-expiry", "3d")
    page.click("#key-limits summary")
    page.fill("#key-rate", "100/minute")
    page.fill("#key-ips", "127.0.0.0/8\n::1/128")
    screenshot(page, "generate", tmp_path)
    page.click("#key-submit")
    page.wait_for_selector("#dlg-reveal[open]")
    screenshot(page, "reveal", tmp_path)
    key = _take_secret(page)
    assert re.fullmatch(r"kg_live_\w{38}", key)
    row = page.locator(_row(page, "web-app"))
    assert row.locator(".badge").inner_text() == "expiring soon"
    assert "alice" in row.inner_text()

    with httpx.Client(base_url=server.base, timeout=10) as http:
        as_key = {"Authorization": f"Bearer {key}"}
        for _ in range(3):
            said = http.post("/v1/generate", headers=as_key, json={"prompt": "hello world"})
            assert said.status_code == 200
        chat = {"model": "default", "messages": [{"role": "user", "content": "hi"}]}
        assert http.post("/v1/chat/completions", headers=as_key, json=chat).status_code == 200
        refused = http.post("/v1/images/generations", headers=as_key, json={"prompt": "x"})
        assert refused.status_code == 403

        row.get_by_role("button", name="Usage web-app").click()
        _wait_for_calls(page, 5)
        titles = page.eval_on_selector_all(
            "#chart-calls title", "els => els.map(e => e.textContent)"
        )
        assert any("text:generate: 3" in t and "chat:completions: 1" in t for t in titles)
        assert page.locator("#usage-limits meter").count() >= 3
        assert "insufficient_permissions" in page.inner_text("#usage-codes")
        page.select_option("#log-status", "4")
        assert "/v1/images/generations" in page.inner_text("#log-body")
        page.click("#range-30d + label")
        page.wait_for_selector("#usage-updated:has-text('day by day')")
        page.click("#range-1h + label")
        page.wait_for_selector("#usage-updated:has-text('minute by minute')")
        _wait_for_calls(page, 5)
        screenshot(page, "usage", tmp_path)

        page.click("#tab-alerts")
        page.wait_for_selector("#deliveries-body tr")
        page.fill("#alerts-owner", "alice")
        page.press("#alerts-owner", "Enter")
        page.wait_for_selector("#alerts-form[data-owner='alice'] #alerts-defaults:checked")
        page.uncheck("#alerts-defaults")
        page.fill("#alerts-quota", "50, 90, 100")
        page.fill("#alerts-url", HOOK)
        page.check("#kind-key-rotated")
        page.check("#kind-key-revoked")
        page.click("#alerts-form button[type=submit]")
        webhook_secret = _take_secret(page)
        assert webhook_secret.startswith("whsec_")

        page.click("#tab-keys")
        row.get_by_role("button", name="Rotate web-app").click()
        page.select_option("#rotate-grace", "0")
        page.click("#rotate-form button[type=submit]")
        rotated = _take_secret(page)
        assert rotated != key
        assert http.post("/v1/generate", headers=as_key, json={"prompt": "x"}).status_code == 401
        as_new = {"Authorization": f"Bearer {rotated}"}
        assert http.post("/v1/generate", headers=as_new, json={"prompt": "x"}).status_code == 200

        row.get_by_role("button", name="Revoke web-app").click()
        page.fill("#revoke-reason", "end of the test")
        page.click("#revoke-form button[type=submit]")
        page.wait_for_selector(f"{_row(page, 'web-app')} .badge:text-is('revoked')")
        refused = http.post("/v1/generate", headers=as_new, json={"prompt": "x"})
        assert refused.status_code == 401

    page.click("#tab-alerts")
    page.wait_for_selector("#deliveries-body td:has-text('key.revoked')")
    assert "key.rotated" in page.inner_text("#deliveries-body")
    assert "token" not in page.inner_text("#deliveries-body")
    screenshot(page, "alerts", tmp_path)

    recorder.assert_only(server.base)
    for secret in (key, rotated, webhook_secret):
        recorder.assert_never_sent(secret)
        assert secret not in page.evaluate(PEEK)
    recorder.assert_never_sent(server.admin, as_bearer=True)


def test_self_service_user_sees_and_reaches_only_its_own_owner(
    browser: Browser,  # noqa: F811
    live_server: LiveServer,  # noqa: F811
    recorder: Recorder,
    tmp_path: Path,
) -> None:
    """A keys:self key, at phone width and by keyboard alone: its owner's keys only, in
    the table and in every answer the page gets; other owners' keys answer 404 to the
    very calls the page makes, and stay untouched."""
    server = live_server
    mine, me = server.new_key(name="alice-self", owner="alice", scopes=["keys:self", "text:*"])
    _, sibling = server.new_key(name="alice-batch", owner="alice", scopes=["text:generate"])
    _, theirs = server.new_key(name="bob-prod", owner="bob", scopes=["text:generate"])
    page = _page(browser, server, recorder, viewport={"width": 375, "height": 780})
    page.add_init_script(KEEP_BODIES)
    try:
        page.goto(server.base + "/dashboard")
        assert page.evaluate("document.activeElement.id") == "signin-key"
        page.keyboard.type(mine)
        page.keyboard.press("Enter")
        page.wait_for_selector("#keys-body tr[data-key]")
        page.wait_for_timeout(300)  # the last-used column fills in
        assert page.inner_text("#who-role") == "self-service"
        shown = page.eval_on_selector_all(
            "#keys-body tr[data-key]", "rs => rs.map(r => r.dataset.key)"
        )
        with server.http() as http:
            alices = http.get(
                "/v1/keys?owner=alice", headers={"Authorization": f"Bearer {server.admin}"}
            ).json()["data"]
        assert sorted(shown) == sorted(k["id"] for k in alices)
        assert {me["id"], sibling["id"]} <= set(shown)
        assert theirs["id"] not in page.content()
        assert "bob" not in page.content()
        assert page.locator("#keys-head th:has-text('Owner')").count() == 0
        screenshot(page, "phone-keys", tmp_path)

        page.focus("#key-new")
        page.keyboard.press("Enter")
        page.wait_for_selector("#dlg-key[open]")
        assert page.is_hidden("#key-owner-field")
        assert page.is_disabled("#scope-image-create")  # it cannot grant what it lacks
        assert page.is_enabled("#scope-text-generate")
        page.keyboard.press("Escape")
        page.wait_for_selector("#dlg-key", state="hidden")

        page.focus("#tab-keys")
        page.keyboard.press("ArrowRight")
        assert page.evaluate("document.activeElement.id") == "tab-usage"
        page.wait_for_selector("#usage-updated:has-text('Updated')")
        assert page.is_hidden("#usage-owner-field")
        options = page.eval_on_selector_all("#usage-key option", "os => os.map(o => o.value)")
        assert theirs["id"] not in options
        page.keyboard.press("ArrowRight")
        page.wait_for_selector("#deliveries-body tr")
        assert page.input_value("#alerts-owner") == "alice"
        assert page.get_attribute("#alerts-owner", "readonly") is not None

        attempts = page.evaluate(
            """async ([id]) => {
                const key = sessionStorage.getItem('keyguard.dashboard.key');
                const headers = {
                    Authorization: `Bearer ${key}`, 'Content-Type': 'application/json',
                };
                const call = async (method, path, body) => {
                    const init = {method, headers, body: body && JSON.stringify(body)};
                    return (await fetch(path, init)).status;
                };
                return [
                    await call('GET', `/v1/keys/${id}`),
                    await call('PATCH', `/v1/keys/${id}`, {name: 'taken'}),
                    await call('POST', `/v1/keys/${id}/rotate`, {grace_seconds: 0}),
                    await call('POST', `/v1/keys/${id}/revoke`, {reason: 'x'}),
                    await call('GET', `/v1/keys/${id}/usage`),
                    await call('GET', `/v1/keys/${id}/errors`),
                    await call('GET', '/v1/usage?owner=bob'),
                    await call('GET', '/v1/alerts/settings?owner=bob'),
                    await call('PUT', '/v1/alerts/settings?owner=bob', {webhooks: []}),
                    await call('GET', '/v1/alerts/deliveries?owner=bob'),
                    await call('POST', '/v1/keys', {name: 'x', owner: 'bob'}),
                ];
            }""",
            [theirs["id"]],
        )
        assert attempts == [404, 404, 404, 404, 404, 404, 403, 403, 403, 403, 403]
        bodies: list[str] = page.evaluate("window.__bodies")
        recorder.assert_only(server.base)
        recorder.assert_never_sent(mine, as_bearer=True)
    finally:
        page.context.close()

    with server.http() as http:
        after = http.get(
            f"/v1/keys/{theirs['id']}", headers={"Authorization": f"Bearer {server.admin}"}
        ).json()
    assert after["name"] == "bob-prod"
    assert after["status"] == "active"
    assert after["hint"] == theirs["hint"]
    assert len(bodies) > 10
    for body in bodies:
        assert theirs["id"] not in body
        assert '"bob"' not in body
