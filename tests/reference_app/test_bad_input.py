"""Bad input gets the shape of keyguard's refusals, never a 500 or an echo."""

from __future__ import annotations

from pathlib import Path

import pytest
from reference_app.config import ServerSettings

from keyguard import KeyGuardSettings, StorageError
from keyguard.backends.local_limiter import LocalWindowsRateStore

from .conftest import MakeServer, Server


def _error(answer_json: dict[str, object]) -> dict[str, object]:
    error = answer_json["error"]
    assert isinstance(error, dict)
    assert set(error) >= {"code", "message", "type"}
    return error


@pytest.mark.parametrize(
    ("body", "code", "param"),
    [
        (b"{not json", "invalid_json", None),
        (b'{"prompt": 5}', "invalid_value", "prompt"),
        (b'{"prompt": "x", "max_tokens": "many"}', "invalid_value", "max_tokens"),
        (b'{"prompt": "x", "max_tokens": 0}', "invalid_value", "max_tokens"),
        (b"{}", "missing_field", "prompt"),
        (b'["prompt"]', "invalid_value", None),
        (b'{"prompt": "x", "surprise": 1}', "invalid_value", "surprise"),
    ],
)
def test_malformed_requests_are_400_in_the_refusal_shape(
    server: Server, body: bytes, code: str, param: str | None
) -> None:
    """Malformed JSON, wrong types, missing and unknown fields: 400 naming the field."""
    answer = server.call(
        "POST",
        "/v1/generate",
        server.demo,
        content=body,
        headers={"content-type": "application/json"},
    )
    assert answer.status_code == 400
    error = _error(answer.json())
    assert error["code"] == code
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param
    assert answer.headers["cache-control"] == "no-store"


def test_unknown_model_is_404_model_not_found(server: Server) -> None:
    """An unknown model is the OpenAI 404, not a 500."""
    for path, body in (
        (
            "/v1/chat/completions",
            {"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]},
        ),
        ("/v1/images/generations", {"model": "gpt-9", "prompt": "x"}),
        ("/v1/audio/speech", {"model": "gpt-9", "input": "x"}),
    ):
        answer = server.call("POST", path, server.demo, json=body)
        assert answer.status_code == 404, path
        assert _error(answer.json())["code"] == "model_not_found"
        assert "gpt-9" not in answer.text  # nothing from the request is echoed


def test_oversized_body_is_413(make_server: MakeServer) -> None:
    """A body over the configured limit gets 413, declared or streamed."""
    server = make_server(server=ServerSettings(max_body_bytes=2048))
    big = {"prompt": "x" * 4096}
    answer = server.call("POST", "/v1/generate", server.demo, json=big)
    assert answer.status_code == 413
    assert _error(answer.json())["code"] == "request_too_large"

    def chunks() -> object:
        for _ in range(8):
            yield b" " * 1024
        yield b'{"prompt": "x"}'

    streamed = server.call(
        "POST",
        "/v1/generate",
        server.demo,
        content=chunks(),
        headers={"content-type": "application/json"},
    )
    assert streamed.status_code == 413
    assert (
        server.call("POST", "/v1/generate", server.demo, json={"prompt": "ok"}).status_code == 200
    )


def test_oversized_body_without_a_key_is_401_and_unread(make_server: MakeServer) -> None:
    """The guard answers first: a stranger's large body is never read."""
    server = make_server(server=ServerSettings(max_body_bytes=2048))
    answer = server.call("POST", "/v1/generate", json={"prompt": "x" * 4096})
    assert answer.status_code == 401


def test_unknown_route_and_method_keep_the_shape(server: Server) -> None:
    """404 and 405 for a valid key look like every other error."""
    missing = server.call("GET", "/v1/nothing-here", server.demo)
    assert missing.status_code == 404
    assert _error(missing.json())["code"] == "not_found"
    wrong = server.call("GET", "/v1/generate", server.demo)
    assert wrong.status_code == 405
    assert _error(wrong.json())["code"] == "method_not_allowed"


def test_bad_multipart_upload_is_400(server: Server) -> None:
    """A transcription of something that is not a WAV, or with no file, is 400."""
    junk = server.call(
        "POST",
        "/v1/audio/transcriptions",
        server.demo,
        files={"file": ("x.wav", b"RIFF....nope", "audio/wav")},
        data={"model": "default"},
    )
    assert junk.status_code == 400
    assert _error(junk.json())["param"] == "file"
    none = server.call("POST", "/v1/audio/transcriptions", server.demo, data={"model": "default"})
    assert none.status_code == 400
    assert _error(none.json())["code"] == "missing_field"


def test_readyz_is_503_when_the_key_store_is_down(
    make_server: MakeServer, tmp_path: object
) -> None:
    """Readiness really asks the stores: a closed store makes it 503."""
    server = make_server(KeyGuardSettings(storage_url="memory://"))
    assert server.call("GET", "/readyz").json() == {
        "status": "ok",
        "checks": {"keys": "ok", "limits": "ok"},
    }
    guard = server.client.app.state.guard  # type: ignore[attr-defined]

    async def down(*_: object, **__: object) -> object:
        from keyguard import StorageError

        raise StorageError("down")

    guard.backends.keys.alist = down
    answer = server.call("GET", "/readyz")
    assert answer.status_code == 503
    assert answer.json()["checks"]["keys"] == "down"


def test_readyz_asks_the_quota_file_on_the_embedded_default(
    make_server: MakeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the embedded default, windows count in memory and quotas in the file: a
    file that no longer answers makes readiness 503, though memory still does."""
    server = make_server(KeyGuardSettings(storage_url=f"sqlite:///{tmp_path}/kg.db"))
    assert server.call("GET", "/readyz").json()["checks"] == {"keys": "ok", "limits": "ok"}
    limiter = server.client.app.state.guard.backends.limiter  # type: ignore[attr-defined]
    assert isinstance(limiter, LocalWindowsRateStore)

    async def down(*_: object, **__: object) -> object:
        raise StorageError("down")

    monkeypatch.setattr(limiter.quotas, "apeek", down)
    answer = server.call("GET", "/readyz")
    assert answer.status_code == 503
    assert answer.json()["checks"] == {"keys": "ok", "limits": "down"}
