"""The FastAPI and Flask examples in docs/examples run as shown, with a key from the CLI."""

from __future__ import annotations

import asyncio
import json
import runpy
from pathlib import Path
from typing import Any

import httpx
import pytest
from flask import Flask

from keyguard.cli import main as keyguard_cli

EXAMPLES = Path(__file__).parents[2] / "docs" / "examples"
PATH = "/v1/chat/completions"


@pytest.fixture
def workdir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> str:
    """A fresh working directory holding the default ./keyguard.db, and a key in it."""
    monkeypatch.chdir(tmp_path)
    for name in ("KEYGUARD_STORAGE_URL", "KEYGUARD_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)
    argv = ["keys", "create", "--name", "demo", "--scopes", "chat:completions", "--json"]
    assert keyguard_cli(argv) == 0
    key: str = json.loads(capsys.readouterr().out)["key"]
    return key


def close(namespace: dict[str, Any]) -> None:
    app = namespace["app"]
    guard = app.extensions["keyguard"].guard if isinstance(app, Flask) else _asgi_guard(app)
    guard.backends.keys.close()
    guard.backends.limiter.close()


def _asgi_guard(app: Any) -> Any:
    return app.user_middleware[0].kwargs["guard"]


def test_fastapi_example(workdir: str) -> None:
    """The FastAPI example answers 401 without a key and 200 with a CLI-made key."""
    namespace = runpy.run_path(str(EXAMPLES / "fastapi_app.py"), run_name="fastapi_app")

    async def both() -> tuple[httpx.Response, httpx.Response]:
        transport = httpx.ASGITransport(namespace["app"])
        async with httpx.AsyncClient(transport=transport, base_url="http://example") as client:
            anonymous = await client.post(PATH)
            keyed = await client.post(PATH, headers={"x-api-key": workdir})
        return anonymous, keyed

    try:
        anonymous, keyed = asyncio.run(both())
    finally:
        close(namespace)
    assert anonymous.status_code == 401
    assert keyed.status_code == 200
    assert keyed.json()["key_id"].startswith("key_")


def test_flask_example(workdir: str) -> None:
    """The Flask example answers 401 without a key and 200 with a CLI-made key."""
    namespace = runpy.run_path(str(EXAMPLES / "flask_app.py"), run_name="flask_app")
    try:
        with httpx.Client(
            transport=httpx.WSGITransport(namespace["app"]), base_url="http://example"
        ) as client:
            anonymous = client.post(PATH)
            keyed = client.post(PATH, headers={"Authorization": f"Bearer {workdir}"})
    finally:
        close(namespace)
    assert anonymous.status_code == 401
    assert keyed.status_code == 200
    assert keyed.json()["key_id"].startswith("key_")
