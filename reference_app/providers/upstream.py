"""Forward chat completions, embeddings and images to an OpenAI-compatible server.

The upstream is named by ``KEYGUARD_UPSTREAM_URL`` (e.g. ``https://host/v1``) and
called with the server's own key, ``KEYGUARD_UPSTREAM_KEY``.

**Security note**: nothing of the caller's request but the validated body fields is
sent on: never its headers, so never its keyguard key. The upstream key lives in
this process only, is sent only to the configured URL, and is never logged.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import httpx

from ..errors import ApiError
from ..tokens import count_tokens
from .base import ChatCall, Completion, Embeddings, ProviderFailed, ProviderTimedOut, StreamPiece

__all__ = ["Upstream"]

_CODE = re.compile(r"[a-z0-9_]{1,64}")


class Upstream:
    """An OpenAI-compatible upstream, as a text and an image provider.

    :param url: the base URL, up to and including ``/v1``.
    :param key: the server's upstream key (sent as a bearer token), or ``None``.
    :param timeout: seconds for any one upstream call (504 when exceeded).
    :param transport: an httpx transport, for tests (``httpx.MockTransport``).
    """

    def __init__(
        self,
        url: str,
        key: str | None,
        *,
        timeout: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        headers = {"authorization": f"Bearer {key}"} if key else {}
        self._client = httpx.AsyncClient(
            base_url=url.rstrip("/") + "/",
            headers=headers,
            timeout=timeout,
            transport=transport,
            follow_redirects=False,  # a redirect would carry the upstream key elsewhere
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _post(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        try:
            response = await self._client.post(path, json=body)
        except httpx.TimeoutException as exc:
            raise ProviderTimedOut from exc
        except httpx.HTTPError as exc:
            raise ProviderFailed from exc
        _raise_for(response.status_code, response.content)
        try:
            answer = response.json()
        except ValueError as exc:
            raise ProviderFailed from exc
        if not isinstance(answer, dict):
            raise ProviderFailed
        return answer

    async def chat(self, call: ChatCall) -> Completion:
        answer = await self._post("chat/completions", _chat_body(call, stream=False))
        try:
            text = answer["choices"][0]["message"]["content"] or ""
            finish = answer["choices"][0].get("finish_reason") or "stop"
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            raise ProviderFailed from exc
        usage = answer.get("usage") or {}
        prompt = _int(usage.get("prompt_tokens"), _prompt_tokens(call))
        done = _int(usage.get("completion_tokens"), count_tokens(text))
        return Completion(str(text), str(answer.get("model", call.model)), prompt, done, finish)

    async def stream(self, call: ChatCall) -> AsyncIterator[StreamPiece]:
        body = _chat_body(call, stream=True)
        text: list[str] = []
        usage: dict[str, Any] = {}
        model, finish = call.model, "stop"
        try:
            async with self._client.stream("POST", "chat/completions", json=body) as response:
                if response.status_code >= 400:
                    _raise_for(response.status_code, await response.aread())
                async for line in response.aiter_lines():
                    chunk = _sse_data(line)
                    if chunk is None:
                        continue
                    model = str(chunk.get("model", model))
                    usage = chunk.get("usage") or usage
                    for choice in chunk.get("choices") or ():
                        finish = choice.get("finish_reason") or finish
                        piece = (choice.get("delta") or {}).get("content") or ""
                        if piece:
                            text.append(piece)
                            yield StreamPiece(piece, model)
        except httpx.TimeoutException as exc:
            raise ProviderTimedOut from exc
        except httpx.HTTPError as exc:
            raise ProviderFailed from exc
        whole = "".join(text)
        done = Completion(
            whole,
            model,
            _int(usage.get("prompt_tokens"), _prompt_tokens(call)),
            _int(usage.get("completion_tokens"), count_tokens(whole)),
            finish,
        )
        yield StreamPiece("", model, done)

    async def embed(self, model: str, inputs: Sequence[str]) -> Embeddings:
        answer = await self._post("embeddings", {"model": model, "input": list(inputs)})
        try:
            vectors = tuple(tuple(float(x) for x in d["embedding"]) for d in answer["data"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ProviderFailed from exc
        usage = answer.get("usage") or {}
        tokens = _int(usage.get("prompt_tokens"), sum(count_tokens(t) for t in inputs))
        return Embeddings(vectors, str(answer.get("model", model)), tokens)

    async def generate(
        self, model: str, prompt: str, size: tuple[int, int], n: int
    ) -> tuple[str, tuple[bytes, ...]]:
        body = {
            "model": model,
            "prompt": prompt,
            "n": n,
            "size": f"{size[0]}x{size[1]}",
            "response_format": "b64_json",
        }
        answer = await self._post("images/generations", body)
        try:
            images = tuple(base64.b64decode(d["b64_json"], validate=True) for d in answer["data"])
        except (KeyError, TypeError, binascii.Error) as exc:
            raise ProviderFailed from exc
        return str(answer.get("model", model)), images


def _chat_body(call: ChatCall, *, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": call.model,
        "messages": [{"role": m.role, "content": m.content} for m in call.messages],
        "max_tokens": call.max_tokens,
    }
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def _prompt_tokens(call: ChatCall) -> int:
    return sum(count_tokens(m.content) for m in call.messages)


def _int(value: object, default: int) -> int:
    return (
        value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else default
    )


def _sse_data(line: str) -> dict[str, Any] | None:
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if not data or data == "[DONE]":
        return None
    try:
        chunk = json.loads(data)
    except ValueError as exc:
        raise ProviderFailed from exc
    return chunk if isinstance(chunk, dict) else None


def _raise_for(status: int, content: bytes) -> None:
    """5xx is the provider's failure (502, refunded); 4xx is relayed with its code."""
    if status < 400:
        return
    if status >= 500 or status in {401, 403}:  # our upstream key is the upstream's problem
        raise ProviderFailed(f"upstream answered {status}")
    code = "upstream_refused"
    try:
        error = json.loads(content).get("error") or {}
        if isinstance(error.get("code"), str) and _CODE.fullmatch(error["code"]):
            code = error["code"]
    except (ValueError, AttributeError):
        pass
    status = 400 if status not in {404, 409, 413, 422, 429} else status
    raise ApiError(status, code, "The upstream provider refused the request.")
