"""Image services: creation (OpenAI wire format), editing, style transfer, analysis.

Images travel as base64 PNG in JSON both ways (``b64_json``), or as a ``data:`` URL
when ``response_format`` is ``url``: the server keeps no files to link to.
"""

from __future__ import annotations

import base64
import binascii
import time
from typing import Annotated

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from keyguard import Identity

from ..catalogue import Service
from ..context import Context
from ..errors import ERRORS, ApiError
from ..openai_wire import ImageItem, ImageRequest, ImagesResponse, ImageUsage
from ..providers import ProviderFailed, UnknownModel
from ..tokens import count_tokens

__all__ = ["router"]

Base64Png = Annotated[str, Field(min_length=8, max_length=3_000_000, description="a PNG, base64")]
Model = Annotated[str, Field(min_length=1, max_length=128)]


class EditRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image: Base64Png
    prompt: Annotated[str, Field(min_length=1, max_length=4000)]
    model: Model = "default"


class StyleRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image: Base64Png
    style: Annotated[str, Field(min_length=1, max_length=200)]
    model: Model = "default"


class AnalyzeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image: Base64Png
    model: Model = "default"


class Analysis(BaseModel):
    model: str
    facts: dict[str, object]


def _png(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "invalid_value", "image is not valid base64.", param="image") from None


def _items(images: tuple[bytes, ...], as_url: bool, prompt: str) -> list[ImageItem]:
    out = []
    for image in images:
        encoded = base64.b64encode(image).decode()
        if as_url:
            out.append(ImageItem(url="data:image/png;base64," + encoded, revised_prompt=prompt))
        else:
            out.append(ImageItem(b64_json=encoded, revised_prompt=prompt))
    return out


def router(ctx: Context) -> APIRouter:
    """The image routes."""
    api = APIRouter(prefix="/v1/images", tags=["image"], responses=ERRORS)
    needs_image_analyze = ctx.caller(Service.IMAGE_ANALYZE)
    needs_image_create = ctx.caller(Service.IMAGE_CREATE)
    needs_image_edit = ctx.caller(Service.IMAGE_EDIT)
    needs_image_style = ctx.caller(Service.IMAGE_STYLE)

    def answer(model: str, images: tuple[bytes, ...], prompt: str, as_url: bool) -> ImagesResponse:
        tokens = count_tokens(prompt)
        return ImagesResponse(
            created=int(time.time()),
            model=model,
            data=_items(images, as_url, prompt),
            usage=ImageUsage(input_tokens=tokens, output_tokens=0, total_tokens=tokens),
        )

    async def edited(caller: Identity, model: str, image: str, instruction: str) -> ImagesResponse:
        try:
            name, out = await ctx.providers.editor.edit(model, _png(image), instruction)
        except ValueError as exc:
            await ctx.meter.refund(caller)
            raise ApiError(400, "invalid_value", "image is not a PNG.", param="image") from exc
        except (ProviderFailed, UnknownModel):
            await ctx.meter.refund(caller)
            raise
        return answer(name, (out,), instruction, as_url=False)

    @api.post("/generations", summary="Create images (OpenAI wire format)")
    async def generations(
        body: ImageRequest, caller: Identity = needs_image_create
    ) -> ImagesResponse:
        try:
            name, images = await ctx.providers.image.generate(
                body.model, body.prompt, body.dimensions(), body.n
            )
        except (ProviderFailed, UnknownModel, ApiError):
            await ctx.meter.refund(caller)
            raise
        return answer(name, images, body.prompt, body.response_format == "url")

    @api.post("/edits", summary="Edit an image")
    async def edits(body: EditRequest, caller: Identity = needs_image_edit) -> ImagesResponse:
        return await edited(caller, body.model, body.image, body.prompt)

    @api.post("/style", summary="Transfer a style onto an image")
    async def style(body: StyleRequest, caller: Identity = needs_image_style) -> ImagesResponse:
        return await edited(caller, body.model, body.image, "style: " + body.style)

    @api.post("/analyze", summary="Analyse an image")
    async def analyze(body: AnalyzeRequest, caller: Identity = needs_image_analyze) -> Analysis:
        try:
            name, facts = await ctx.providers.editor.describe(body.model, _png(body.image))
        except ValueError as exc:
            await ctx.meter.refund(caller)
            raise ApiError(400, "invalid_value", "image is not a PNG.", param="image") from exc
        except (ProviderFailed, UnknownModel):
            await ctx.meter.refund(caller)
            raise
        return Analysis(model=name, facts=facts)

    return api
