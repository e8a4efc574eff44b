"""Text services: generation, code, translation, summaries and embeddings.

Each is one chat call to the text provider (a system prompt says the task, so an
upstream model does it; the offline stand-in reads the task hint), billed in tokens.
"""

from __future__ import annotations

import time
from typing import Annotated, Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from keyguard import Identity

from ..catalogue import Service
from ..context import Context
from ..errors import ERRORS
from ..openai_wire import (
    EmbeddingItem,
    EmbeddingList,
    EmbeddingRequest,
    EmbeddingUsage,
    Usage,
    new_id,
)
from ..providers import ChatCall, Message, ProviderFailed, UnknownModel

__all__ = ["router"]

Model = Annotated[str, Field(min_length=1, max_length=128)]
MaxTokens = Annotated[int, Field(ge=1, le=4096)]
LongText = Annotated[str, Field(min_length=1, max_length=32_000)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GenerateRequest(_Body):
    prompt: LongText
    model: Model = "default"
    max_tokens: MaxTokens = 64

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"prompt": "hello keyguard", "max_tokens": 16}]},
    )


class CodeRequest(_Body):
    prompt: LongText
    language: Annotated[str, Field(min_length=1, max_length=32)] = "python"
    model: Model = "default"
    max_tokens: MaxTokens = 256


class TranslateRequest(_Body):
    text: LongText
    target_language: Annotated[str, Field(min_length=2, max_length=16)]
    source_language: Annotated[str, Field(min_length=2, max_length=16)] | None = None
    model: Model = "default"
    max_tokens: MaxTokens = 256


class SummarizeRequest(_Body):
    text: LongText
    model: Model = "default"
    max_tokens: MaxTokens = 64


class TextResult(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    text: str
    finish_reason: str
    usage: Usage


def router(ctx: Context) -> APIRouter:
    """The text routes."""
    api = APIRouter(prefix="/v1", tags=["text"], responses=ERRORS)
    needs_text_code = ctx.caller(Service.TEXT_CODE)
    needs_text_embed = ctx.caller(Service.TEXT_EMBED)
    needs_text_generate = ctx.caller(Service.TEXT_GENERATE)
    needs_text_summarize = ctx.caller(Service.TEXT_SUMMARIZE)
    needs_text_translate = ctx.caller(Service.TEXT_TRANSLATE)

    async def run(
        identity: Identity, model: str, system: str, user: str, limit: int, **hint: str
    ) -> TextResult:
        messages = (Message("system", system), Message("user", user))
        call = ChatCall(model, messages, limit, dict(hint))
        done = await ctx.complete(identity, call)
        return TextResult(
            id=new_id("cmpl"),
            created=int(time.time()),
            model=done.model,
            text=done.text,
            finish_reason=done.finish_reason,
            usage=Usage.of(done),
        )

    @api.post("/generate", summary="Generate text from a prompt")
    async def generate(body: GenerateRequest, caller: Identity = needs_text_generate) -> TextResult:
        system = "Continue or answer the user's prompt."
        return await run(caller, body.model, system, body.prompt, body.max_tokens, task="generate")

    @api.post("/code", summary="Generate code")
    async def code(body: CodeRequest, caller: Identity = needs_text_code) -> TextResult:
        system = f"Write {body.language} code for the user's request. Answer with code only."
        return await run(
            caller,
            body.model,
            system,
            body.prompt,
            body.max_tokens,
            task="code",
            language=body.language,
        )

    @api.post("/translate", summary="Translate text")
    async def translate(
        body: TranslateRequest, caller: Identity = needs_text_translate
    ) -> TextResult:
        source = f" from {body.source_language}" if body.source_language else ""
        system = f"Translate the user's text{source} into {body.target_language}."
        return await run(
            caller,
            body.model,
            system,
            body.text,
            body.max_tokens,
            task="translate",
            target=body.target_language,
        )

    @api.post("/summarize", summary="Summarize text")
    async def summarize(
        body: SummarizeRequest, caller: Identity = needs_text_summarize
    ) -> TextResult:
        system = "Summarize the user's text briefly."
        return await run(caller, body.model, system, body.text, body.max_tokens, task="summarize")

    @api.post("/embeddings", summary="Embed text (OpenAI wire format)")
    async def embeddings(
        body: EmbeddingRequest, caller: Identity = needs_text_embed
    ) -> EmbeddingList:
        try:
            done = await ctx.providers.text.embed(body.model, body.inputs())
        except (ProviderFailed, UnknownModel):
            await ctx.meter.refund(caller)
            raise
        await ctx.meter.settle(caller, done.prompt_tokens)
        return EmbeddingList(
            data=[EmbeddingItem(index=i, embedding=list(v)) for i, v in enumerate(done.vectors)],
            model=done.model,
            usage=EmbeddingUsage(prompt_tokens=done.prompt_tokens, total_tokens=done.prompt_tokens),
        )

    return api
