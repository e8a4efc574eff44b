"""The reference server: first run, public paths and a guarded route."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from reference_app.__main__ import main

from keyguard.settings import KeyGuardSettings
from reference_app import create_app

KEY = re.compile(r"kg_live_[0-9A-Za-z]{38}")


@pytest.fixture
def settings(tmp_path: Path) -> KeyGuardSettings:
    return KeyGuardSettings(storage_url=f"sqlite:///{tmp_path / 'keyguard.db'}")


def test_first_run_prints_a_demo_key_once(
    settings: KeyGuardSettings, capsys: pytest.CaptureFixture[str]
) -> None:
    """An empty store gets a demo key printed once; a restart prints nothing."""
    with TestClient(create_app(settings)):
        pass
    first = capsys.readouterr().err
    keys = KEY.findall(first)
    assert keys
    assert "curl" in first
    with TestClient(create_app(settings)):
        pass
    assert not KEY.findall(capsys.readouterr().err)


def test_guarded_and_public_routes(
    settings: KeyGuardSettings, capsys: pytest.CaptureFixture[str]
) -> None:
    """Health and docs are public; generation needs a key with text:generate."""
    with TestClient(create_app(settings)) as client:
        key = KEY.findall(capsys.readouterr().err)[0]
        assert client.get("/healthz").status_code == 200
        assert client.get("/docs").status_code == 200
        assert client.post("/v1/generate", json={"prompt": "a b"}).status_code == 401
        ok = client.post("/v1/generate", json={"prompt": "a b"}, headers={"X-API-Key": key})
        assert ok.status_code == 200
        assert ok.json()["text"] == "b a"
        assert "ratelimit-policy" in ok.headers
        who = client.get("/v1/whoami", headers={"Authorization": f"Bearer {key}"})
        assert who.json()["name"] == "demo"
        assert key not in who.text


def test_client_credentials_token_works_on_v1_routes(
    settings: KeyGuardSettings, capsys: pytest.CaptureFixture[str]
) -> None:
    """POST /oauth/token trades the demo key for a token that /v1 routes accept."""
    with TestClient(create_app(settings)) as client:
        key = KEY.findall(capsys.readouterr().err)[0]
        key_id = client.get("/v1/whoami", headers={"X-API-Key": key}).json()["id"]
        form = {"grant_type": "client_credentials", "client_id": key_id, "client_secret": key}
        issued = client.post("/oauth/token", data=form)
        assert issued.status_code == 200
        token = issued.json()["access_token"]
        assert key not in issued.text
        who = client.get("/v1/whoami", headers={"Authorization": f"Bearer {token}"})
        assert who.status_code == 200
        assert who.json()["id"] == key_id
        assert client.get("/.well-known/jwks.json").json()["keys"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.mark.parametrize(("argv", "loop"), [([], "asyncio"), (["--loop", "uvloop"], "uvloop")])
def test_the_server_runs_on_asyncio_s_loop_unless_told(
    argv: list[str], loop: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """uvloop's tail under load was several times longer (see ``__main__``): the server
    asks uvicorn for asyncio's loop, and for uvloop only when told."""
    ran: dict[str, object] = {}
    monkeypatch.setattr("uvicorn.run", lambda app, **options: ran.update(options))
    monkeypatch.setattr("gc.freeze", lambda: None)  # not in the test process
    monkeypatch.setenv("KEYGUARD_STORAGE_URL", "memory://")
    assert main(argv) == 0
    assert ran == {"host": "127.0.0.1", "port": 8000, "loop": loop}


def test_uvloop_asked_for_but_missing_is_one_line_and_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The server extra no longer installs uvloop: asking for it without it is a clear
    line, not uvicorn's traceback."""
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    monkeypatch.setattr("uvicorn.run", lambda app, **options: pytest.fail("served"))
    assert main(["--loop", "uvloop"]) == 2
    assert capsys.readouterr().err == (
        "reference_app: --loop uvloop needs uvloop: pip install uvloop\n"
    )


def test_the_server_process_serves_on_loopback(tmp_path: Path) -> None:
    """``python -m reference_app`` starts uvicorn and answers on the given port."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "reference_app", "--port", str(port)],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.1)
        assert response.json() == {"status": "ok"}
        assert (tmp_path / "keyguard.db").exists()
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert KEY.search(err)
