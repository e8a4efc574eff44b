"""What a service asks of a model provider, as small Protocols.

Services never know whether a stand-in or a remote server answers: they call a
:class:`TextProvider`, :class:`ImageProvider` or :class:`SpeechProvider`. A provider
raises :class:`UnknownModel` (404), :class:`ProviderFailed` (502) or
:class:`ProviderTimedOut` (504); the server refunds the units of a failed call.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

__all__ = [
    "ChatCall",
    "Completion",
    "Embeddings",
    "ImageEditor",
    "ImageProvider",
    "Message",
    "ProviderFailed",
    "ProviderTimedOut",
    "Providers",
    "SpeechProvider",
    "StreamPiece",
    "TextProvider",
    "UnknownModel",
]


class UnknownModel(LookupError):
    """No provider serves the model a request named."""


class ProviderFailed(Exception):
    """The provider could not answer (an upstream 5xx, a refused connection)."""


class ProviderTimedOut(ProviderFailed):
    """The provider did not answer in time."""


@dataclass(frozen=True, slots=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True, slots=True)
class ChatCall:
    """A chat request as providers see it: the wire details already stripped."""

    model: str
    messages: tuple[Message, ...]
    max_tokens: int
    extra: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Completion:
    text: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str = "stop"

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class StreamPiece:
    """One streamed delta; the last piece carries the usage (``done``)."""

    text: str
    model: str
    done: Completion | None = None


@dataclass(frozen=True, slots=True)
class Embeddings:
    vectors: tuple[tuple[float, ...], ...]
    model: str
    prompt_tokens: int


class TextProvider(Protocol):
    """Chat completions (every text service is one) and embeddings."""

    async def chat(self, call: ChatCall) -> Completion: ...

    def stream(self, call: ChatCall) -> AsyncIterator[StreamPiece]: ...

    async def embed(self, model: str, inputs: Sequence[str]) -> Embeddings: ...


class ImageProvider(Protocol):
    """PNG images from a prompt."""

    async def generate(
        self, model: str, prompt: str, size: tuple[int, int], n: int
    ) -> tuple[str, tuple[bytes, ...]]: ...


class ImageEditor(Protocol):
    """Changes to, and facts about, a PNG the caller sends."""

    async def edit(self, model: str, image: bytes, instruction: str) -> tuple[str, bytes]: ...

    async def describe(self, model: str, image: bytes) -> tuple[str, dict[str, object]]: ...


class SpeechProvider(Protocol):
    """Text to WAV, and WAV to text."""

    async def speak(self, model: str, text: str, voice: str, speed: float) -> tuple[str, bytes]: ...

    async def transcribe(self, model: str, audio: bytes) -> tuple[str, str, float]: ...


@dataclass(frozen=True, slots=True)
class Providers:
    """The providers one server uses; the offline stand-ins unless an upstream is set."""

    text: TextProvider
    image: ImageProvider
    editor: ImageEditor
    speech: SpeechProvider
