"""The upstream provider, against a fake OpenAI-compatible server (MockTransport):
forwarded with the server's key, never the caller's; failures are 502/504, refunded."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable

import httpx
import pytest
from pydantic import SecretStr
from reference_app.config import ServerSettings
from reference_app.media import solid_png

from keyguard import load_settings

from .conftest import MakeServer, Server
from .test_scopes_and_limits import _remaining

UPSTREAM_KEY = "sk-upstream-server-only-0123456789"
Handler = Callable[[httpx.Request], httpx.Response]


class FakeUpstream:
    """Answers like an OpenAI server and remembers what it was sent."""

    def __init__(self) -> None:
        self.seen: list[httpx.Request] = []
        self.fail: int | None = None
        self.timeout = False

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request)
        if self.timeout:
            raise httpx.ReadTimeout("slow", request=request)
        if self.fail is not None:
            return httpx.Response(self.fail, json={"error": {"code": "boom", "message": "x"}})
        body = json.loads(request.content)
        path = request.url.path
        if path.endswith("/chat/completions") and body.get("stream"):
            return httpx.Response(
                200, content=_sse(body), headers={"content-type": "text/event-stream"}
            )
        if path.endswith("/chat/completions"):
            return httpx.Response(
                200,
                json={
                    "model": "up-model",
                    "choices": [
                        {
                            "message": {"role": "assistant", "content": "from upstream"},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9},
                },
            )
        if path.endswith("/embeddings"):
            return httpx.Response(
                200,
                json={
                    "model": "up-embed",
                    "data": [{"embedding": [0.5, 0.5]} for _ in body["input"]],
                    "usage": {"prompt_tokens": 4, "total_tokens": 4},
                },
            )
        png = base64.b64encode(solid_png(2, 2, b"\x01\x02\x03", b"\x04\x05\x06")).decode()
        return httpx.Response(200, json={"model": "up-image", "data": [{"b64_json": png}]})


def _sse(body: dict[str, object]) -> bytes:
    events = [
        {"model": "up-model", "choices": [{"delta": {"content": "up"}, "finish_reason": None}]},
        {
            "model": "up-model",
            "choices": [{"delta": {"content": "stream"}, "finish_reason": "stop"}],
        },
        {"model": "up-model", "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}},
    ]
    lines = [b"data: " + json.dumps(e).encode() + b"\n\n" for e in events]
    return b"".join(lines) + b"data: [DONE]\n\n"


@pytest.fixture
def fake() -> FakeUpstream:
    return FakeUpstream()


@pytest.fixture
def proxied(make_server: MakeServer, fake: FakeUpstream) -> Server:
    settings = load_settings(
        env_file=None, storage_url="memory://", plans={"free": {"quota_daily": 10_000}}
    )
    server = ServerSettings(
        upstream_url="http://upstream.test/v1", upstream_key=SecretStr(UPSTREAM_KEY)
    )
    return make_server(settings, server, httpx.MockTransport(fake))


def test_chat_is_forwarded_with_the_servers_key_never_the_callers(
    proxied: Server, fake: FakeUpstream
) -> None:
    """The upstream sees the server's key; the caller's key never leaves the server."""
    answer = proxied.call(
        "POST",
        "/v1/chat/completions",
        proxied.demo,
        json={"model": "gpt-x", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"] == "from upstream"
    assert answer.json()["usage"]["total_tokens"] == 9
    (sent,) = fake.seen
    assert sent.url == "http://upstream.test/v1/chat/completions"
    assert sent.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert proxied.demo not in str(sent.headers) + sent.content.decode()
    assert json.loads(sent.content)["model"] == "gpt-x"


def test_streaming_embeddings_and_images_are_forwarded(proxied: Server, fake: FakeUpstream) -> None:
    """Streams are relayed as OpenAI chunks; embeddings and images pass through."""
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True}
    streamed = proxied.call("POST", "/v1/chat/completions", proxied.demo, json=body)
    assert streamed.status_code == 200
    pieces = [
        json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")
    ]
    assert (
        "".join(p["choices"][0]["delta"].get("content", "") for p in pieces if p["choices"])
        == "upstream"
    )
    assert json.loads(fake.seen[-1].content)["stream_options"] == {"include_usage": True}
    embedded = proxied.call(
        "POST", "/v1/embeddings", proxied.demo, json={"model": "e", "input": ["a", "b"]}
    )
    assert embedded.json()["data"][1]["embedding"] == [0.5, 0.5]
    image = proxied.call(
        "POST", "/v1/images/generations", proxied.demo, json={"prompt": "p", "model": "i"}
    )
    assert image.json()["model"] == "up-image"
    assert json.loads(fake.seen[-1].content)["response_format"] == "b64_json"


@pytest.mark.parametrize(
    ("fail", "timeout", "status"), [(500, False, 502), (503, False, 502), (None, True, 504)]
)
def test_provider_failure_is_502_or_504_and_refunded(
    proxied: Server, fake: FakeUpstream, fail: int | None, timeout: bool, status: int
) -> None:
    """A failing or slow upstream gives 502/504 in the refusal shape; units come back."""
    before = _remaining(proxied.call("GET", "/v1/whoami", proxied.demo).headers, "daily")
    fake.fail, fake.timeout = fail, timeout
    answer = proxied.call(
        "POST",
        "/v1/chat/completions",
        proxied.demo,
        json={"model": "m", "messages": [{"role": "user", "content": "x"}]},
    )
    assert answer.status_code == status
    assert answer.json()["error"]["type"] == "api_error"
    assert UPSTREAM_KEY not in answer.text
    fake.fail, fake.timeout = None, False
    after = _remaining(proxied.call("GET", "/v1/whoami", proxied.demo).headers, "daily")
    assert after == before - 1  # only the second whoami; the failed chat was refunded


def test_upstream_4xx_is_relayed_as_a_client_error(proxied: Server, fake: FakeUpstream) -> None:
    """An upstream refusal of the request (404 model) is a 4xx here too, not a 502."""
    fake.fail = 404
    answer = proxied.call(
        "POST",
        "/v1/chat/completions",
        proxied.demo,
        json={"model": "m", "messages": [{"role": "user", "content": "x"}]},
    )
    assert answer.status_code == 404
    assert answer.json()["error"]["code"] == "boom"
