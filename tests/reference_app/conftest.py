"""Fixtures for the reference server: an app on in-memory stores, in process, with
the two first-run keys it printed."""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
import pytest
from fastapi.testclient import TestClient
from reference_app.config import ServerSettings

from keyguard import KeyGuardSettings
from reference_app import create_app

KEY = re.compile(r"kg_live_[0-9A-Za-z]{38}")


@dataclass
class Server:
    """A started app: its client, the demo key and the admin key."""

    client: TestClient
    demo: str
    admin: str

    def call(self, method: str, path: str, key: str | None = None, **kwargs: Any) -> Any:
        headers = dict(kwargs.pop("headers", {}))
        if key is not None:
            headers["X-API-Key"] = key
        return self.client.request(method, path, headers=headers, **kwargs)

    def new_key(self, key: str | None = None, **body: Any) -> tuple[str, dict[str, Any]]:
        """Create a key through the API (as the admin unless ``key`` says otherwise)."""
        body.setdefault("name", "test")
        answer = self.call("POST", "/v1/keys", key or self.admin, json=body)
        assert answer.status_code == 201, answer.text
        issued = answer.json()
        return issued["key"], issued["record"]


class MakeServer(Protocol):
    def __call__(
        self,
        settings: KeyGuardSettings | None = None,
        server: ServerSettings | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> Server: ...


@pytest.fixture
def make_server() -> Iterator[MakeServer]:
    """Start servers (memory stores unless told); each is stopped at teardown."""
    stack: list[Callable[[], object]] = []

    def make(
        settings: KeyGuardSettings | None = None,
        server: ServerSettings | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> Server:
        console = io.StringIO()
        app = create_app(
            settings or KeyGuardSettings(storage_url="memory://"),
            server=server or ServerSettings(),
            upstream_transport=transport,
            console=console,
        )
        client = TestClient(app, raise_server_exceptions=False)
        client.__enter__()
        stack.append(lambda: client.__exit__(None, None, None))
        demo, admin = KEY.findall(console.getvalue())[:2]
        return Server(client, demo, admin)

    yield make
    for close in reversed(stack):
        close()


@pytest.fixture
def server(make_server: MakeServer) -> Server:
    return make_server()
