"""A real server process and Debian's Chromium, driven by Playwright, for the dashboard.

Playwright never downloads a browser here: it launches the system's ``chromium``
(``make test`` installs it when missing). Without it, or without the ``playwright``
package, the browser tests skip with a message saying how to install it -- except in
CI (``CI=true``), where that is a failure, as for Redis (see ``redis_support.py``).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page, Request

INSTALL_HINT = (
    "the dashboard's browser tests need Debian's chromium and the playwright package: "
    "apt-get install chromium; pip install -e '.[dev]' (or run `make test`)"
)
KEY = re.compile(r"kg_live_[0-9A-Za-z]{38}")
SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "images" / "dashboard"


def _missing(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason}; {INSTALL_HINT} -- CI must run the browser tests")
    pytest.skip(f"{reason}; {INSTALL_HINT}")


def chromium_path() -> str:
    """The system Chromium's executable, or skip (fail in CI)."""
    found = (
        os.environ.get("KEYGUARD_CHROMIUM")
        or shutil.which("chromium")
        or shutil.which("chromium-browser")
    )
    if found is None:
        _missing("chromium not found")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _missing("the playwright package is not installed")
    assert found is not None
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class LiveServer:
    """``python -m reference_app`` on a free loopback port, on a temporary SQLite file."""

    base: str
    demo: str
    admin: str
    process: subprocess.Popen[bytes]

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.base, timeout=10)

    def new_key(self, **body: object) -> tuple[str, dict[str, Any]]:
        """A key made through the API by the admin: (secret, record)."""
        with self.http() as http:
            made = http.post(
                "/v1/keys", headers={"Authorization": f"Bearer {self.admin}"}, json=body
            )
        assert made.status_code == 201, made.text
        issued = made.json()
        return issued["key"], issued["record"]


def start_server(workdir: Path) -> LiveServer:
    port = _free_port()
    log = workdir / "stderr.txt"
    env = {**os.environ, "KEYGUARD_STORAGE_URL": f"sqlite:///{workdir / 'kg.db'}"}
    with log.open("w") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "reference_app", "--port", str(port)],
            cwd=workdir,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            httpx.get(base + "/healthz", timeout=1).raise_for_status()
            break
        except httpx.TransportError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise
            time.sleep(0.1)
    demo, admin = KEY.findall(log.read_text())[:2]
    return LiveServer(base, demo, admin, process)


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server = start_server(tmp_path_factory.mktemp("dashboard-server"))
    try:
        yield server
    finally:
        server.process.terminate()
        server.process.wait(timeout=10)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Headless Chromium from the system (Playwright's own browsers are never fetched)."""
    executable = chromium_path()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, headless=True)
        try:
            yield launched
        finally:
            launched.close()


@dataclass
class Recorder:
    """Every request a page sends, and every error the page itself reports."""

    requests: list[Request] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def attach(self, page: Page) -> None:
        # A bound method is refused as a handler by Playwright: it needs a function.
        page.on("request", lambda request: self.requests.append(request))  # noqa: PLW0108
        page.on("pageerror", lambda exc: self.problems.append(f"page error: {exc}"))
        page.on(
            "console",
            lambda msg: (
                self.problems.append(f"console: {msg.text}")
                if "Content Security Policy" in msg.text or "Refused to" in msg.text
                else None
            ),
        )

    def assert_only(self, base: str) -> None:
        """Nothing was loaded from anywhere but the server, and the page raised nothing."""
        assert self.requests, "the page sent no request"
        outside = [r.url for r in self.requests if not r.url.startswith(base + "/")]
        assert outside == []
        assert self.problems == []

    def assert_never_sent(self, secret: str, *, as_bearer: bool = False) -> None:
        """``secret`` is in no URL, header or body the page sent (except, with
        ``as_bearer``, as the whole ``Authorization`` header of its own calls)."""
        for request in self.requests:
            assert secret not in request.url
            assert secret not in (request.post_data or "")
            for name, value in request.all_headers().items():
                if as_bearer and name.lower() == "authorization":
                    assert value == f"Bearer {secret}"
                    continue
                assert secret not in value, f"{name} of {request.url}"


def screenshot(page: Page, name: str, tmp: Path) -> Path:
    """Save a screenshot: into docs/images/dashboard/ when KEYGUARD_UPDATE_SCREENSHOTS=1
    (to refresh the committed ones), else beside the test's temporary files."""
    folder = SCREENSHOTS if os.environ.get("KEYGUARD_UPDATE_SCREENSHOTS") == "1" else tmp
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    page.screenshot(path=str(path))
    assert path.stat().st_size > 1000
    return path
