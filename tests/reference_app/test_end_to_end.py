"""The real server process under uvicorn, driven over HTTP on loopback: first run,
key lifecycle through the admin API, each service family, streaming, revocation."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .browser_support import start_server


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[str, str, str]]:
    """``python -m reference_app`` on a free port: base URL, demo key, admin key."""
    server = start_server(tmp_path)
    try:
        yield server.base, server.demo, server.admin
    finally:
        server.process.terminate()
        server.process.wait(timeout=10)


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
