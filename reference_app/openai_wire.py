"""The OpenAI wire format: request and response bodies, and server-sent events.

Chat completions, embeddings, image generation, speech and transcription accept
what an OpenAI client sends (unknown fields are ignored, as the OpenAI API does for
fields it no longer uses) and answer in the shapes it parses, ``usage`` included,
so a client pointed at this server with ``base_url`` works unchanged.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .providers import Completion, Message
from .tokens import count_tokens

__all__ = [
    "ChatCompletion",
    "ChatCompletionRequest",
    "ChatMessage",
    "EmbeddingRequest",
    "ImageRequest",
    "SpeechRequest",
    "Usage",
    "chat_completion",
    "chunk_event",
    "new_id",
]

MAX_TOKENS = 4096
Text = Annotated[str, Field(max_length=32_000)]


def new_id(prefix: str) -> str:
    """An opaque id such as ``chatcmpl-...``."""
    return f"{prefix}-{secrets.token_hex(12)}"


class _Lenient(BaseModel):
    """Unknown fields are ignored: clients send more than a stand-in uses."""

    model_config = ConfigDict(extra="ignore")


class ContentPart(_Lenient):
    type: Literal["text"] = "text"
    text: Text


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | Annotated[list[ContentPart], Field(max_length=64)] | None = None
    name: Annotated[str, Field(max_length=64)] | None = None

    def plain(self) -> Message:
        """The message as text: parts joined, no content as empty."""
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        return Message(self.role, content or "")


class StreamOptions(_Lenient):
    include_usage: bool = False


class ChatCompletionRequest(_Lenient):
    model: Annotated[str, Field(min_length=1, max_length=128)]
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=256)]
    max_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Field(ge=1, le=1)] = 1
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    user: Annotated[str, Field(max_length=256)] | None = None

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "examples": [
                {
                    "model": "default",
                    "messages": [{"role": "user", "content": "Say hello to keyguard"}],
                    "max_tokens": 32,
                }
            ]
        },
    )

    def limit(self) -> int:
        """The most tokens the answer may have: what the request may cost."""
        return self.max_completion_tokens or self.max_tokens or 256


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int

    @classmethod
    def of(cls, done: Completion) -> Usage:
        return cls(
            prompt_tokens=done.prompt_tokens,
            completion_tokens=done.completion_tokens,
            total_tokens=done.total_tokens,
        )


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


def chat_completion(done: Completion) -> ChatCompletion:
    return ChatCompletion(
        id=new_id("chatcmpl"),
        created=int(time.time()),
        model=done.model,
        choices=[
            Choice(message=AssistantMessage(content=done.text), finish_reason=done.finish_reason)
        ],
        usage=Usage.of(done),
    )


def chunk_event(
    chunk_id: str,
    model: str,
    *,
    content: str | None = None,
    finish: str | None = None,
    usage: Usage | None = None,
    role: bool = False,
) -> bytes:
    """One ``chat.completion.chunk`` as an SSE ``data:`` event."""
    delta: dict[str, Any] = {}
    if role:
        delta["role"] = "assistant"
    if content is not None:
        delta["content"] = content
    choices = [] if usage is not None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    chunk: dict[str, Any] = {
        "id": chunk_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
    }
    if usage is not None:
        chunk["usage"] = usage.model_dump()
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"


def error_event(code: str, message: str) -> bytes:
    """A failure after the stream began: the status is sent already, so it is an event."""
    body = {"error": {"code": code, "message": message, "type": "api_error"}}
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


DONE_EVENT = b"data: [DONE]\n\n"


class EmbeddingRequest(_Lenient):
    model: Annotated[str, Field(min_length=1, max_length=128)]
    input: Text | Annotated[list[Text], Field(min_length=1, max_length=256)]

    def inputs(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class EmbeddingItem(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float]


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingItem]
    model: str
    usage: EmbeddingUsage


ImageSize = Literal["256x256", "512x512", "1024x1024"]


class ImageRequest(_Lenient):
    prompt: Annotated[str, Field(min_length=1, max_length=4000)]
    model: Annotated[str, Field(min_length=1, max_length=128)] = "default"
    n: Annotated[int, Field(ge=1, le=4)] = 1
    size: ImageSize = "256x256"
    response_format: Literal["b64_json", "url"] = "b64_json"

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={"examples": [{"prompt": "a lighthouse at dusk", "size": "256x256"}]},
    )

    def dimensions(self) -> tuple[int, int]:
        width, height = self.size.split("x")
        return int(width), int(height)


class ImageItem(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None


class ImageUsage(BaseModel):
    input_tokens: int
    output_tokens: int
    total_tokens: int


class ImagesResponse(BaseModel):
    created: int
    model: str
    data: list[ImageItem]
    usage: ImageUsage


class SpeechRequest(_Lenient):
    model: Annotated[str, Field(min_length=1, max_length=128)]
    input: Annotated[str, Field(min_length=1, max_length=4096)]
    voice: Annotated[str, Field(min_length=1, max_length=64)] = "alloy"
    response_format: Literal["wav"] = "wav"
    speed: Annotated[float, Field(ge=0.25, le=4.0)] = 1.0

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={"examples": [{"model": "default", "input": "Hello!", "voice": "alloy"}]},
    )


class TranscriptionUsage(BaseModel):
    type: Literal["duration"] = "duration"
    seconds: float


class Transcription(BaseModel):
    text: str
    model: str
    usage: TranscriptionUsage


def prompt_tokens(messages: list[Message]) -> int:
    return sum(count_tokens(m.content) for m in messages)
