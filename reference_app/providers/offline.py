"""Deterministic offline stand-ins: no network, no model, honest output.

Every answer is derived from the input (the same request always gets the same
bytes), token counts are what :mod:`reference_app.tokens` counts in the text, and
the ``model`` field names an offline stand-in so nobody mistakes it for a model.
They answer to their own names and to ``default``.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Sequence

from ..media import png_info, read_speech, solid_png, speech_wav, wav_info
from ..tokens import count_tokens, split_tokens, truncate_tokens
from .base import ChatCall, Completion, Embeddings, StreamPiece, UnknownModel

__all__ = [
    "EMBED_MODEL",
    "IMAGE_MODEL",
    "SPEECH_MODEL",
    "TEXT_MODEL",
    "TRANSCRIBE_MODEL",
    "OfflineImages",
    "OfflineSpeech",
    "OfflineText",
]

TEXT_MODEL = "keyguard-offline-stand-in-text"
EMBED_MODEL = "keyguard-offline-stand-in-embed"
IMAGE_MODEL = "keyguard-offline-stand-in-image"
SPEECH_MODEL = "keyguard-offline-stand-in-speech"
TRANSCRIBE_MODEL = "keyguard-offline-stand-in-transcribe"
_DIMENSIONS = 16


def _model(asked: str, own: str) -> str:
    if asked not in (own, "default"):
        raise UnknownModel(asked)
    return own


def _reply(call: ChatCall) -> str:
    """What the stand-in "says" for a task: a transformation a reader can check."""
    last = next((m.content for m in reversed(call.messages) if m.role == "user"), "")
    task = call.extra.get("task")
    if task == "code":
        language = str(call.extra.get("language", "python"))
        asked = " ".join(last.split())
        text = f"# {language} (offline stand-in) for: {asked}\ndef solution():\n    return None\n"
    elif task == "translate":
        text = f"[{call.extra.get('target', 'en')}] {last}"
    elif task == "summarize":
        text = last
    else:  # generation and chat: the prompt's words, last first
        text = " ".join(reversed(last.split()))
    return text


class OfflineText:
    """Chat (and so every text task) and embeddings, offline."""

    async def chat(self, call: ChatCall) -> Completion:
        model = _model(call.model, TEXT_MODEL)
        text, cut = truncate_tokens(_reply(call), call.max_tokens)
        prompt = sum(count_tokens(m.content) for m in call.messages)
        return Completion(text, model, prompt, count_tokens(text), "length" if cut else "stop")

    async def stream(self, call: ChatCall) -> AsyncIterator[StreamPiece]:
        done = await self.chat(call)
        sent = 0
        for token in split_tokens(done.text):
            at = done.text.index(token, sent)
            piece, sent = done.text[sent : at + len(token)], at + len(token)
            yield StreamPiece(piece, done.model)
            await asyncio.sleep(0)  # let the server flush each chunk, as a real model would
        yield StreamPiece(done.text[sent:], done.model, done)

    async def embed(self, model: str, inputs: Sequence[str]) -> Embeddings:
        name = _model(model, EMBED_MODEL)
        vectors = tuple(_vector(text) for text in inputs)
        return Embeddings(vectors, name, sum(count_tokens(t) for t in inputs))


def _vector(text: str) -> tuple[float, ...]:
    digest = hashlib.sha256(text.encode()).digest()
    raw = [b - 127.5 for b in digest[:_DIMENSIONS]]
    norm = sum(x * x for x in raw) ** 0.5 or 1.0
    return tuple(round(x / norm, 6) for x in raw)


def colours(seed: str) -> tuple[bytes, bytes]:
    """Two colours derived from ``seed``: the same prompt always paints the same."""
    digest = hashlib.sha256(seed.encode()).digest()
    return digest[:3], digest[3:6]


class OfflineImages:
    """PNG gradients whose colours come from the prompt."""

    async def generate(
        self, model: str, prompt: str, size: tuple[int, int], n: int
    ) -> tuple[str, tuple[bytes, ...]]:
        name = _model(model, IMAGE_MODEL)
        images = []
        for i in range(n):
            top, bottom = colours(f"{i}:{prompt}")
            images.append(await asyncio.to_thread(solid_png, size[0], size[1], top, bottom))
        return name, tuple(images)

    async def edit(self, model: str, image: bytes, instruction: str) -> tuple[str, bytes]:
        """A new PNG of the same size, coloured by the image and the instruction."""
        name = _model(model, IMAGE_MODEL)
        info = png_info(image)
        if info is None:
            raise ValueError("not a PNG image")
        seed = hashlib.sha256(image).hexdigest() + instruction
        top, bottom = colours(seed)
        width, height = min(info.width, 1024), min(info.height, 1024)
        return name, await asyncio.to_thread(solid_png, width, height, top, bottom)

    async def describe(self, model: str, image: bytes) -> tuple[str, dict[str, object]]:
        """What the header says, and a digest; no pretence of seeing the picture."""
        name = _model(model, IMAGE_MODEL)
        info = png_info(image)
        if info is None:
            raise ValueError("not a PNG image")
        facts: dict[str, object] = {
            "format": "png",
            "width": info.width,
            "height": info.height,
            "bit_depth": info.bit_depth,
            "colour_type": info.colour_type,
            "bytes": len(image),
            "sha256": hashlib.sha256(image).hexdigest(),
            "description": f"a {info.width}x{info.height} PNG (offline stand-in: header only)",
        }
        return name, facts


class OfflineSpeech:
    """Speech as tones that encode the text; transcription that reads them back."""

    async def speak(self, model: str, text: str, voice: str, speed: float) -> tuple[str, bytes]:
        name = _model(model, SPEECH_MODEL)
        return name, await asyncio.to_thread(speech_wav, text, speed=speed)

    async def transcribe(self, model: str, audio: bytes) -> tuple[str, str, float]:
        """``(model, text, seconds)``; audio it did not make is described, not guessed."""
        name = _model(model, TRANSCRIBE_MODEL)
        parsed = wav_info(audio)
        if parsed is None:
            raise ValueError("not a WAV file")
        info, pcm = parsed
        text = await asyncio.to_thread(read_speech, info, pcm)
        if text is None:
            text = f"[offline stand-in: {info.seconds:.2f} s of audio at {info.rate} Hz]"
        return name, text, info.seconds
