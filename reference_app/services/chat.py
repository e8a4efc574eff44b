"""Chat services: completions (OpenAI wire format, streaming as server-sent events),
a chatbot hook, and conversations that keep their context within a token budget.

A streamed completion settles its units when the stream ends: to the tokens of the
whole answer, to those sent before the client went away, or to nothing when the
provider failed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from keyguard import Identity

from ..catalogue import Service
from ..context import Context, most_tokens
from ..conversations import Conversation, tenant_of, trim_context
from ..errors import ERRORS, ApiError
from ..openai_wire import (
    DONE_EVENT,
    ChatCompletion,
    ChatCompletionRequest,
    Usage,
    chat_completion,
    chunk_event,
    error_event,
    new_id,
)
from ..providers import ChatCall, Message, ProviderFailed, StreamPiece, UnknownModel
from ..tokens import count_tokens

__all__ = ["router"]

_SSE: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "A chat completion, or with `stream: true` server-sent events",
        "content": {"text/event-stream": {}},
    }
}
Model = Annotated[str, Field(min_length=1, max_length=128)]


class BotRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    message: Annotated[str, Field(min_length=1, max_length=8000)]
    bot: Annotated[str, Field(min_length=1, max_length=64)] = "assistant"
    model: Model = "default"
    max_tokens: Annotated[int, Field(ge=1, le=4096)] = 128


class BotReply(BaseModel):
    bot: str
    reply: str
    model: str
    usage: Usage


class NewConversation(BaseModel):
    model_config = ConfigDict(extra="forbid")

    system: Annotated[str, Field(max_length=8000)] | None = None
    max_context_tokens: Annotated[int, Field(ge=16, le=32_000)] = 2048


class ConversationMessage(BaseModel):
    role: str
    content: str


class ConversationOut(BaseModel):
    id: str
    object: str = "conversation"
    created: int
    system: str | None
    max_context_tokens: int
    messages: list[ConversationMessage]
    context_tokens: int


class Say(BaseModel):
    model_config = ConfigDict(extra="forbid")

    content: Annotated[str, Field(min_length=1, max_length=8000)]
    model: Model = "default"
    max_tokens: Annotated[int, Field(ge=1, le=4096)] = 128


class Turn(BaseModel):
    conversation_id: str
    reply: ConversationMessage
    model: str
    usage: Usage
    context_messages: int
    trimmed_messages: int


def _out(conversation: Conversation) -> ConversationOut:
    sent, _ = trim_context(conversation.system, conversation.messages, conversation.budget)
    return ConversationOut(
        id=conversation.id,
        created=conversation.created,
        system=conversation.system,
        max_context_tokens=conversation.budget,
        messages=[
            ConversationMessage(role=m.role, content=m.content) for m in conversation.messages
        ],
        context_tokens=sum(count_tokens(m.content) for m in sent),
    )


def _missing() -> ApiError:
    return ApiError(404, "not_found", "No such conversation.", param="conversation_id")


async def _events(
    ctx: Context,
    *,
    caller: Identity,
    call: ChatCall,
    first: StreamPiece,
    rest: AsyncIterator[StreamPiece],
    include_usage: bool,
) -> AsyncIterator[bytes]:
    chunk_id = new_id("chatcmpl")
    prompt = sum(count_tokens(m.content) for m in call.messages)
    sent: list[str] = []
    used: int | None = None
    try:
        yield chunk_event(chunk_id, first.model, content="", role=True)
        piece: StreamPiece | None = first
        while piece is not None:
            if piece.text:
                sent.append(piece.text)
                yield chunk_event(chunk_id, piece.model, content=piece.text)
            if piece.done is not None:
                done = piece.done
                used = done.total_tokens
                yield chunk_event(chunk_id, done.model, finish=done.finish_reason)
                if include_usage:
                    yield chunk_event(chunk_id, done.model, usage=Usage.of(done))
                yield DONE_EVENT
                return
            piece = await anext(rest, None)
    except (ProviderFailed, UnknownModel):
        used = 0  # the provider failed: refund all
        yield error_event("provider_error", "The model provider failed.")
    finally:
        if used is None:  # the client went away: bill what it was sent
            used = prompt + count_tokens("".join(sent))
        await ctx.meter.settle(caller, used)


def router(ctx: Context) -> APIRouter:
    """The chat routes."""
    api = APIRouter(prefix="/v1", tags=["chat"], responses=ERRORS)
    needs_chat_bot = ctx.caller(Service.CHAT_BOT)
    needs_chat_completions = ctx.caller(Service.CHAT_COMPLETIONS)

    @api.post(
        "/chat/completions",
        summary="Chat completions (OpenAI wire format; SSE when stream is true)",
        responses=_SSE,
        response_model=ChatCompletion,
    )
    async def completions(
        body: ChatCompletionRequest, caller: Identity = needs_chat_completions
    ) -> ChatCompletion | Response:
        call = ChatCall(body.model, tuple(m.plain() for m in body.messages), body.limit())
        if not body.stream:
            return chat_completion(await ctx.complete(caller, call))
        await ctx.meter.reserve(caller, most_tokens(call))
        stream = ctx.providers.text.stream(call)
        try:  # fail before the 200 when the provider fails at once: a 502, not an event
            first = await anext(stream)
        except (ProviderFailed, UnknownModel, ApiError):
            await ctx.meter.refund(caller)
            raise
        include = body.stream_options is not None and body.stream_options.include_usage
        events = _events(
            ctx, caller=caller, call=call, first=first, rest=stream, include_usage=include
        )
        return StreamingResponse(
            events, media_type="text/event-stream", headers={"cache-control": "no-cache"}
        )

    @api.post("/chat/bot", summary="Chatbot hook: one message in, one reply out")
    async def bot(body: BotRequest, caller: Identity = needs_chat_bot) -> BotReply:
        system = f"You are the chatbot {body.bot!r}. Reply to the user's message."
        messages = (Message("system", system), Message("user", body.message))
        done = await ctx.complete(caller, ChatCall(body.model, messages, body.max_tokens))
        return BotReply(bot=body.bot, reply=done.text, model=done.model, usage=Usage.of(done))

    conversations(api, ctx)
    return api


def conversations(api: APIRouter, ctx: Context) -> None:
    """Create, read, continue and delete conversations, per tenant."""
    needs_scope = ctx.caller(Service.CHAT_CONVERSATIONS)

    @api.post("/conversations", summary="Start a conversation", status_code=201)
    async def create(body: NewConversation, caller: Identity = needs_scope) -> ConversationOut:
        made = ctx.conversations.create(
            tenant_of(caller), system=body.system, budget=body.max_context_tokens
        )
        return _out(made)

    @api.get("/conversations/{conversation_id}", summary="Read a conversation")
    async def read(conversation_id: str, caller: Identity = needs_scope) -> ConversationOut:
        found = ctx.conversations.get(tenant_of(caller), conversation_id)
        if found is None:
            raise _missing()
        return _out(found)

    @api.post("/conversations/{conversation_id}/messages", summary="Say something; get the reply")
    async def say(conversation_id: str, body: Say, caller: Identity = needs_scope) -> Turn:
        found = ctx.conversations.get(tenant_of(caller), conversation_id)
        if found is None:
            raise _missing()
        said = Message("user", body.content)
        context, trimmed = trim_context(found.system, [*found.messages, said], found.budget)
        done = await ctx.complete(caller, ChatCall(body.model, tuple(context), body.max_tokens))
        reply = Message("assistant", done.text)
        ctx.conversations.append(found, said, reply)
        return Turn(
            conversation_id=found.id,
            reply=ConversationMessage(role="assistant", content=done.text),
            model=done.model,
            usage=Usage.of(done),
            context_messages=len(context),
            trimmed_messages=trimmed,
        )

    @api.delete(
        "/conversations/{conversation_id}", summary="Delete a conversation", status_code=204
    )
    async def delete(conversation_id: str, caller: Identity = needs_scope) -> Response:
        if not ctx.conversations.delete(tenant_of(caller), conversation_id):
            raise _missing()
        return Response(status_code=204)
