"""Audio services: speech and transcription (OpenAI wire format), voice cloning and
processing. Audio is WAV both ways."""

from __future__ import annotations

import base64
import binascii
import hashlib
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, UploadFile
from fastapi.responses import PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from keyguard import Identity

from ..catalogue import Service
from ..context import Context
from ..errors import ERRORS, ApiError
from ..media import WavInfo, process_pcm, wav_info, write_wav
from ..openai_wire import SpeechRequest, Transcription, TranscriptionUsage
from ..providers import ProviderFailed, UnknownModel
from ..providers.offline import SPEECH_MODEL

__all__ = ["router"]

Base64Wav = Annotated[str, Field(min_length=8, max_length=3_000_000, description="a WAV, base64")]
_WAV: dict[int | str, dict[str, Any]] = {
    200: {"content": {"audio/wav": {}}, "description": "A WAV file"}
}


class CloneRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(min_length=1, max_length=64)]
    sample: Base64Wav


class Voice(BaseModel):
    id: str
    name: str
    sample_seconds: float
    model: str


class ProcessRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    audio: Base64Wav
    operation: Literal["normalize", "reverse", "gain"]
    gain_db: Annotated[float, Field(ge=-24, le=24)] = 0.0


def _wav(text: str, field: str) -> tuple[bytes, WavInfo, bytes]:
    """The file, its format and its frames, or 400 naming ``field``."""
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "invalid_value", f"{field} is not valid base64.", param=field) from None
    parsed = wav_info(data)
    if parsed is None:
        raise ApiError(400, "invalid_value", f"{field} is not a WAV file.", param=field)
    return data, parsed[0], parsed[1]


def router(ctx: Context) -> APIRouter:
    """The audio routes."""
    api = APIRouter(prefix="/v1/audio", tags=["audio"], responses=ERRORS)
    needs_audio_clone = ctx.caller(Service.AUDIO_CLONE)
    needs_audio_process = ctx.caller(Service.AUDIO_PROCESS)
    needs_audio_speech = ctx.caller(Service.AUDIO_SPEECH)
    needs_audio_transcribe = ctx.caller(Service.AUDIO_TRANSCRIBE)

    @api.post(
        "/speech",
        summary="Text to speech (OpenAI wire format)",
        response_class=Response,
        responses=_WAV,
    )
    async def speech(body: SpeechRequest, caller: Identity = needs_audio_speech) -> Response:
        try:
            _, audio = await ctx.providers.speech.speak(
                body.model, body.input, body.voice, body.speed
            )
        except (ProviderFailed, UnknownModel):
            await ctx.meter.refund(caller)
            raise
        return Response(audio, media_type="audio/wav")

    @api.post(
        "/transcriptions",
        summary="Speech to text (OpenAI wire format)",
        response_model=Transcription,
        responses={200: {"content": {"text/plain": {}}}},
    )
    async def transcriptions(
        file: Annotated[UploadFile, File(description="a WAV file")],
        model: Annotated[str, Form(min_length=1, max_length=128)],
        response_format: Annotated[Literal["json", "text"], Form()] = "json",
        language: Annotated[str | None, Form(max_length=16)] = None,
        caller: Identity = needs_audio_transcribe,
    ) -> Response | Transcription:
        audio = await file.read()
        try:
            name, text, seconds = await ctx.providers.speech.transcribe(model, audio)
        except ValueError:
            await ctx.meter.refund(caller)
            raise ApiError(400, "invalid_value", "file is not a WAV file.", param="file") from None
        except (ProviderFailed, UnknownModel):
            await ctx.meter.refund(caller)
            raise
        if response_format == "text":
            return PlainTextResponse(text)
        return Transcription(
            text=text, model=name, usage=TranscriptionUsage(seconds=round(seconds, 3))
        )

    @api.post("/voices", summary="Clone a voice from a sample", status_code=201)
    async def clone(body: CloneRequest, caller: Identity = needs_audio_clone) -> Voice:
        data, info, _ = _wav(body.sample, "sample")
        voice_id = "voice_" + hashlib.sha256(data).hexdigest()[:16]
        return Voice(
            id=voice_id, name=body.name, sample_seconds=round(info.seconds, 3), model=SPEECH_MODEL
        )

    @api.post("/process", summary="Process audio", response_class=Response, responses=_WAV)
    async def process(body: ProcessRequest, caller: Identity = needs_audio_process) -> Response:
        _, info, pcm = _wav(body.audio, "audio")
        try:
            out = process_pcm(info, pcm, body.operation, body.gain_db)
        except ValueError:
            raise ApiError(
                400, "invalid_value", "only 16-bit audio can be processed.", param="audio"
            ) from None
        return Response(write_wav(info, out), media_type="audio/wav")

    return api
