"""The real server process under uvicorn, driven over HTTP on loopback: first run,
key lifecycle through the admin API, each service family, streaming, revocation."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .conftest import KEY


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[str, str, str]]:
    """``python -m reference_app`` on a free port: base URL, demo key, admin key."""
    port = _free_port()
    log = tmp_path / "stderr.txt"
    env = {**os.environ, "KEYGUARD_STORAGE_URL": f"sqlite:///{tmp_path / 'kg.db'}"}
    with log.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "reference_app", "--port", str(port)],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(base + "/healthz", timeout=1).raise_for_status()
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.1)
        demo, admin = KEY.findall(log.read_text())[:2]
        yield base, demo, admin
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_the_served_api_end_to_end(running: tuple[str, str, str]) -> None:
    """Admin creates a key, it calls every family (streaming too), and revocation bites."""
    base, demo, admin = running
    with httpx.Client(base_url=base, timeout=10) as http:
        assert http.get("/readyz").json()["status"] == "ok"
        as_admin = {"Authorization": f"Bearer {admin}"}
        made = http.post(
            "/v1/keys",
            headers=as_admin,
            json={
                "name": "e2e",
                "owner": "e2e",
                "scopes": ["text:*", "image:*", "audio:*", "chat:*"],
            },
        )
        assert made.status_code == 201, made.text
        key, key_id = made.json()["key"], made.json()["record"]["id"]
        headers = {"X-API-Key": key}
        generated = http.post("/v1/generate", headers=headers, json={"prompt": "hello there"})
        assert generated.json()["text"] == "there hello"
        image = http.post("/v1/images/generations", headers=headers, json={"prompt": "x"})
        assert base64.b64decode(image.json()["data"][0]["b64_json"]).startswith(b"\x89PNG")
        speech = http.post(
            "/v1/audio/speech", headers=headers, json={"model": "default", "input": "e2e"}
        )
        heard = http.post(
            "/v1/audio/transcriptions",
            headers=headers,
            files={"file": ("a.wav", speech.content, "audio/wav")},
            data={"model": "default"},
        )
        assert heard.json()["text"] == "e2e"
        body = {
            "model": "default",
            "messages": [{"role": "user", "content": "one two three"}],
            "stream": True,
        }
        with http.stream("POST", "/v1/chat/completions", headers=headers, json=body) as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            events = [line for line in stream.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        text = "".join(
            json.loads(e[6:])["choices"][0]["delta"].get("content", "") for e in events[:-1]
        )
        assert text == "three two one"
        assert (
            http.post("/v1/generate", headers={"X-API-Key": demo}, json={"prompt": "x"}).status_code
            == 200
        )
        revoked = http.post(f"/v1/keys/{key_id}/revoke", headers=as_admin, json={"reason": "e2e"})
        assert revoked.json()["status"] == "revoked"
        refused = http.post("/v1/generate", headers=headers, json={"prompt": "x"})
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "invalid_api_key"
        assert http.get("/docs").status_code == 200
