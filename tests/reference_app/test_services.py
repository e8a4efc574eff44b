"""Every AI service route, on the offline stand-ins, in process."""

from __future__ import annotations

import base64
import json
import struct
import zlib

import pytest
from reference_app.media import png_info, solid_png, speech_wav, wav_info
from reference_app.tokens import count_tokens

from .conftest import Server


def _png_pixels(data: bytes) -> tuple[int, int, bytes]:
    info = png_info(data)
    assert info is not None
    idat = b""
    at = 8
    while at < len(data):
        (size,) = struct.unpack(">I", data[at : at + 4])
        kind = data[at + 4 : at + 8]
        if kind == b"IDAT":
            idat += data[at + 8 : at + 8 + size]
        at += 12 + size
    return info.width, info.height, zlib.decompress(idat)


def test_generate_keeps_its_request_shape_and_counts_tokens_honestly(server: Server) -> None:
    """POST /v1/generate takes prompt/model/max_tokens and bills what it counts."""
    answer = server.call(
        "POST", "/v1/generate", server.demo, json={"prompt": "one two three", "max_tokens": 2}
    )
    assert answer.status_code == 200
    body = answer.json()
    assert body["text"] == "three two"
    assert body["finish_reason"] == "length"
    assert "offline-stand-in" in body["model"]
    prompt = "Continue or answer the user's prompt. one two three"
    assert body["usage"] == {
        "prompt_tokens": count_tokens(prompt),
        "completion_tokens": 2,
        "total_tokens": count_tokens(prompt) + 2,
    }


@pytest.mark.parametrize(
    ("path", "body", "expect"),
    [
        ("/v1/code", {"prompt": "add two numbers", "language": "go"}, "# go (offline stand-in)"),
        ("/v1/translate", {"text": "hello", "target_language": "fr"}, "[fr] hello"),
        ("/v1/summarize", {"text": "a b c d e f", "max_tokens": 3}, "a b c"),
    ],
)
def test_text_tasks(server: Server, path: str, body: dict[str, object], expect: str) -> None:
    """Code, translation and summaries answer deterministically from their input."""
    answer = server.call("POST", path, server.demo, json=body)
    assert answer.status_code == 200, answer.text
    assert answer.json()["text"].startswith(expect)


def test_embeddings_follow_the_openai_shape(server: Server) -> None:
    """Embeddings: one unit vector per input, usage in tokens."""
    answer = server.call(
        "POST", "/v1/embeddings", server.demo, json={"model": "default", "input": ["a b", "c"]}
    )
    body = answer.json()
    assert answer.status_code == 200
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert abs(sum(x * x for x in body["data"][0]["embedding"]) - 1) < 1e-3
    assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 3}


def test_image_generation_returns_real_pngs(server: Server) -> None:
    """Image creation answers in the OpenAI shape with decodable PNGs of the size asked."""
    answer = server.call(
        "POST",
        "/v1/images/generations",
        server.demo,
        json={"prompt": "a red fox", "n": 2, "size": "256x256"},
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert len(body["data"]) == 2
    width, height, pixels = _png_pixels(base64.b64decode(body["data"][0]["b64_json"]))
    assert (width, height) == (256, 256)
    assert len(pixels) == height * (1 + 3 * width)
    again = server.call(
        "POST", "/v1/images/generations", server.demo, json={"prompt": "a red fox", "n": 2}
    )
    assert again.json()["data"] == body["data"]  # deterministic
    url = server.call(
        "POST",
        "/v1/images/generations",
        server.demo,
        json={"prompt": "x", "response_format": "url"},
    )
    assert url.json()["data"][0]["url"].startswith("data:image/png;base64,")


def test_image_edit_style_and_analysis(server: Server) -> None:
    """Edits and style transfer keep the size; analysis reads the header honestly."""
    png = base64.b64encode(solid_png(40, 30, b"\x00\x00\x00", b"\xff\xff\xff")).decode()
    for path, extra in (
        ("/v1/images/edits", {"prompt": "sky"}),
        ("/v1/images/style", {"style": "ink"}),
    ):
        answer = server.call("POST", path, server.demo, json={"image": png, **extra})
        assert answer.status_code == 200, answer.text
        out = base64.b64decode(answer.json()["data"][0]["b64_json"])
        info = png_info(out)
        assert info is not None
        assert (info.width, info.height) == (40, 30)
    facts = server.call("POST", "/v1/images/analyze", server.demo, json={"image": png}).json()
    assert facts["facts"]["width"] == 40
    assert facts["facts"]["height"] == 30
    bad = server.call("POST", "/v1/images/analyze", server.demo, json={"image": "bm90IGEgcG5n"})
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "image"


def test_speech_and_transcription_round_trip(server: Server) -> None:
    """Speech is a real WAV; transcribing it (multipart, OpenAI shape) gives the text back."""
    speech = server.call(
        "POST",
        "/v1/audio/speech",
        server.demo,
        json={"model": "default", "input": "héllo keyguard", "voice": "alloy", "speed": 2.0},
    )
    assert speech.status_code == 200, speech.text
    assert speech.headers["content-type"] == "audio/wav"
    assert wav_info(speech.content) is not None
    heard = server.call(
        "POST",
        "/v1/audio/transcriptions",
        server.demo,
        files={"file": ("speech.wav", speech.content, "audio/wav")},
        data={"model": "default"},
    )
    assert heard.status_code == 200, heard.text
    assert heard.json()["text"] == "héllo keyguard"
    assert heard.json()["usage"]["type"] == "duration"
    text = server.call(
        "POST",
        "/v1/audio/transcriptions",
        server.demo,
        files={"file": ("s.wav", speech.content, "audio/wav")},
        data={"model": "default", "response_format": "text"},
    )
    assert text.text == "héllo keyguard"


def test_voice_cloning_and_processing(server: Server) -> None:
    """A voice id comes from its sample; processing returns a WAV of the same length."""
    sample = speech_wav("abc")
    encoded = base64.b64encode(sample).decode()
    voice = server.call(
        "POST", "/v1/audio/voices", server.demo, json={"name": "me", "sample": encoded}
    )
    assert voice.status_code == 201
    assert voice.json()["id"].startswith("voice_")
    for operation in ("reverse", "normalize", "gain"):
        out = server.call(
            "POST",
            "/v1/audio/process",
            server.demo,
            json={"audio": encoded, "operation": operation, "gain_db": -6},
        )
        assert out.status_code == 200, out.text
        parsed, original = wav_info(out.content), wav_info(sample)
        assert parsed is not None
        assert original is not None
        assert parsed[0].frames == original[0].frames


def test_chat_completion_in_openai_shape(server: Server) -> None:
    """A chat completion has id, choices, finish_reason and usage, as OpenAI's does."""
    answer = server.call(
        "POST",
        "/v1/chat/completions",
        server.demo,
        json={"model": "default", "messages": [{"role": "user", "content": "hi there"}], "seed": 1},
    )
    body = answer.json()
    assert answer.status_code == 200, answer.text
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "there hi"}
    assert body["usage"]["total_tokens"] == 4


def _events(text: str) -> list[str]:
    return [line[6:] for line in text.splitlines() if line.startswith("data: ")]


def test_streamed_chat_is_server_sent_events_with_usage(server: Server) -> None:
    """stream: true gives chunk events, a finish reason, the usage and [DONE]."""
    body = {
        "model": "default",
        "messages": [{"role": "user", "content": "alpha beta gamma"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with server.client.stream(
        "POST", "/v1/chat/completions", json=body, headers={"X-API-Key": server.demo}
    ) as answer:
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/event-stream")
        assert "ratelimit" in answer.headers
        events = _events(answer.read().decode())
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "gamma beta alpha"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}


def test_chatbot_hook(server: Server) -> None:
    """The chatbot hook answers one message with one reply and its usage."""
    answer = server.call("POST", "/v1/chat/bot", server.demo, json={"message": "ping pong"})
    assert answer.status_code == 200
    assert answer.json()["reply"] == "pong ping"


def test_conversation_trims_context_to_its_budget(server: Server) -> None:
    """A conversation keeps every message but sends only the newest that fit its budget."""
    made = server.call(
        "POST",
        "/v1/conversations",
        server.demo,
        json={"system": "be brief", "max_context_tokens": 16},
    )
    assert made.status_code == 201
    conversation = made.json()["id"]
    turns = []
    for n in range(4):
        turn = server.call(
            "POST",
            f"/v1/conversations/{conversation}/messages",
            server.demo,
            json={"content": f"message number {n} here"},
        )
        assert turn.status_code == 200, turn.text
        turns.append(turn.json())
    assert turns[0]["trimmed_messages"] == 0
    assert turns[-1]["trimmed_messages"] > 0
    read = server.call("GET", f"/v1/conversations/{conversation}", server.demo).json()
    assert len(read["messages"]) == 8
    assert read["context_tokens"] <= 16
    assert (
        server.call("DELETE", f"/v1/conversations/{conversation}", server.demo).status_code == 204
    )
    assert server.call("GET", f"/v1/conversations/{conversation}", server.demo).status_code == 404


def test_conversations_are_invisible_to_other_tenants(server: Server) -> None:
    """Another owner's key gets 404 for a conversation it did not make."""
    other, _ = server.new_key(owner="someone-else", scopes=["chat:conversations"])
    made = server.call("POST", "/v1/conversations", server.demo, json={}).json()["id"]
    for method, path in (
        ("GET", f"/v1/conversations/{made}"),
        ("DELETE", f"/v1/conversations/{made}"),
        ("POST", f"/v1/conversations/{made}/messages"),
    ):
        body = {"content": "hi"} if method == "POST" else None
        assert server.call(method, path, other, json=body).status_code == 404
    assert server.call("GET", f"/v1/conversations/{made}", server.demo).status_code == 200
