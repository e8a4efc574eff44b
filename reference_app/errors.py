"""Every error the server answers, in the body shape of keyguard's own refusals.

``{"error": {"code", "message", "type", "param"?}}`` is what keyguard's denial table
renders and what callers of AI APIs already parse, so a client handles a 401 from
the guard, a 400 from validation and a 502 from a provider with the same code.
Nothing from the request is echoed except the *name* of an offending field.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from keyguard.denials import render

from .metering import Refused
from .providers.base import ProviderFailed, ProviderTimedOut, UnknownModel

__all__ = [
    "ERRORS",
    "ApiError",
    "ErrorBody",
    "error_body",
    "error_response",
    "install_error_handlers",
]

_logger = logging.getLogger("reference_app")
_TYPES = {
    400: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    502: "api_error",
    504: "api_error",
}
_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


class ErrorDetail(BaseModel):
    code: str
    message: str
    type: str
    param: str | None = None
    scope: str | None = None
    retry_after: int | None = None


class ErrorBody(BaseModel):
    """Every error body: keyguard's refusals, validation, providers."""

    error: ErrorDetail


_SAID = {
    400: "Malformed JSON, a missing field or a wrong type (or a malformed credential)",
    401: "No key, or a key that is invalid, expired or revoked",
    403: "The key lacks the scope, or its address or plan is refused",
    404: "No such route, resource or model",
    413: "The request body is larger than the server allows",
    429: "A rate limit, quota or concurrency cap; see Retry-After",
    502: "The model provider failed (units refunded)",
    503: "A key or limit store is unavailable",
    504: "The model provider timed out (units refunded)",
}
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text} for status, text in _SAID.items()
}
"""The error responses every guarded route documents in OpenAPI."""


class ApiError(Exception):
    """An answer other than success, raised anywhere in a handler."""

    def __init__(self, status: int, code: str, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param


def error_body(status: int, code: str, message: str, param: str | None = None) -> bytes:
    """The JSON body of an error, as keyguard's ``denials.render`` shapes it."""
    error: dict[str, object] = {
        "code": code,
        "message": message,
        "type": _TYPES.get(status, "api_error"),
    }
    if param is not None:
        error["param"] = param
    return json.dumps({"error": error}, separators=(",", ":")).encode()


def error_response(status: int, code: str, message: str, *, param: str | None = None) -> Response:
    """An error response; ``no-store`` because it says something about one caller."""
    return Response(
        error_body(status, code, message, param),
        status_code=status,
        media_type="application/json",
        headers={"cache-control": "no-store"},
    )


def _param(loc: Sequence[Any]) -> str | None:
    # The leading "body"/"query" says where, not what; the rest names the field.
    parts = [str(p) for p in loc[1:]] if len(loc) > 1 else [str(p) for p in loc]
    return ".".join(parts)[:100] or None


async def _validation(_: Request, exc: Exception) -> Response:
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    first = errors[0] if errors else {"type": "invalid", "loc": (), "msg": "invalid"}
    if first["type"] == "json_invalid":
        return error_response(400, "invalid_json", "The request body is not valid JSON.")
    param = _param(first["loc"])
    if first["type"] == "missing":
        return error_response(400, "missing_field", "A required field is missing.", param=param)
    message = "A field has an invalid value: " + str(first["msg"])[:200]
    return error_response(400, "invalid_value", message, param=param)


async def _http(_: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, StarletteHTTPException) else 500
    code = _CODES.get(status, "http_error")
    message = {
        404: "No such route or resource.",
        405: "Method not allowed on this route.",
        413: "The request body is larger than allowed.",
    }
    response = error_response(status, code, message.get(status, "The request failed."))
    if isinstance(exc, StarletteHTTPException) and exc.headers:
        response.headers.update(exc.headers)
    return response


async def _api(_: Request, exc: Exception) -> Response:
    if not isinstance(exc, ApiError):  # pragma: no cover - registered for ApiError only
        raise exc
    return error_response(exc.status, exc.code, exc.message, param=exc.param)


async def _refused(_: Request, exc: Exception) -> Response:
    """A reservation keyguard refused, rendered by keyguard itself (429, limit headers)."""
    if not isinstance(exc, Refused):  # pragma: no cover - registered for Refused only
        raise exc
    status, headers, body = render(exc.denial)
    return Response(body, status_code=status, headers={k.decode(): v.decode() for k, v in headers})


async def _provider(_: Request, exc: Exception) -> Response:
    if isinstance(exc, UnknownModel):
        return error_response(
            404, "model_not_found", "The model does not exist on this server.", param="model"
        )
    if isinstance(exc, ProviderTimedOut):
        _logger.warning("provider timed out: %s", type(exc).__name__)
        return error_response(504, "provider_timeout", "The model provider timed out.")
    _logger.warning("provider failed: %s", type(exc).__name__)
    return error_response(502, "provider_error", "The model provider failed.")


async def _unexpected(_: Request, exc: Exception) -> Response:
    # The type only: a message may hold request data (SECURITY.md T63).
    _logger.error("unhandled %s in the reference server", type(exc).__name__)
    return error_response(500, "internal_error", "An internal error occurred.")


def install_error_handlers(app: FastAPI) -> None:
    """Route every failure through :func:`error_response`."""
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(ApiError, _api)
    app.add_exception_handler(Refused, _refused)
    app.add_exception_handler(ProviderFailed, _provider)
    app.add_exception_handler(UnknownModel, _provider)
    app.add_exception_handler(Exception, _unexpected)
