"""OpenAPI at ``/openapi.json`` and Swagger UI at ``/docs``, offline.

The Swagger UI assets are vendored in ``static/swagger-ui`` (swagger-ui-dist, see
its LICENSE there), so ``/docs`` works with no network. The schema gains, per
operation, the scope it needs (``x-keyguard-scope`` and a line in its description)
and an OAuth client-credentials scheme next to keyguard's key schemes; FastAPI's
422 answers are replaced by the server's 400 error shape, which is what it sends.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from starlette.routing import BaseRoute

from keyguard.adapters.fastapi import Require

from .catalogue import ADMIN_SCOPE, SELF_SCOPE, SERVICE_SCOPES

__all__ = ["ASSETS", "install_docs"]

ASSETS = Path(__file__).parent / "static" / "swagger-ui"
_SCOPES = {s: f"the {s} service" for s in SERVICE_SCOPES} | {
    SELF_SCOPE: "manage your own owner's keys",
    ADMIN_SCOPE: "manage every key (with keys:self)",
}


def _scope(dependant: Dependant) -> str | None:
    for sub in dependant.dependencies:
        if isinstance(sub.call, Require) and sub.call.scope is not None:
            return sub.call.scope
        found = _scope(sub)
        if found is not None:
            return found
    return None


def _annotate(schema: dict[str, Any], routes: Iterable[object]) -> None:
    for route in routes:
        if not isinstance(route, APIRoute):
            continue
        scope = _scope(route.dependant)
        for method in route.methods or ():
            operation = schema["paths"].get(route.path_format, {}).get(method.lower())
            if operation is None:
                continue
            operation["responses"].pop("422", None)
            if scope is None:
                continue
            operation["x-keyguard-scope"] = scope
            needs = f"Requires the scope `{scope}`."
            text = operation.get("description")
            operation["description"] = f"{text}\n\n{needs}" if text else needs
            operation.setdefault("security", []).append({"oauth2": [scope]})


def _openapi(app: FastAPI, declared: Sequence[BaseRoute]) -> dict[str, Any]:
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
        )
        _annotate(schema, declared)
        components = schema.setdefault("components", {})
        for name in ("HTTPValidationError", "ValidationError"):
            components.get("schemas", {}).pop(name, None)
        components.setdefault("securitySchemes", {})["oauth2"] = {
            "type": "oauth2",
            "description": "An access token from POST /oauth/token (client_id: the key id, "
            "client_secret: the key).",
            "flows": {"clientCredentials": {"tokenUrl": "/oauth/token", "scopes": _SCOPES}},
        }
        app.openapi_schema = schema
    return app.openapi_schema


def install_docs(app: FastAPI, declared: Sequence[BaseRoute]) -> None:
    """Serve the schema, Swagger UI and its assets (create the app with
    ``docs_url=None``).

    ``declared`` are the routers' own routes: FastAPI 0.16x wraps included routers
    in lazy ``_IncludedRouter`` entries, so ``app.routes`` no longer lists them.
    """
    app.mount("/static/swagger-ui", StaticFiles(directory=ASSETS), name="swagger-ui")
    app.openapi = lambda: _openapi(app, declared)  # type: ignore[method-assign]

    @app.get("/docs", include_in_schema=False)
    async def swagger() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title=app.title + " - docs",
            swagger_js_url="/static/swagger-ui/swagger-ui-bundle.js",
            swagger_css_url="/static/swagger-ui/swagger-ui.css",
            swagger_favicon_url="/static/swagger-ui/favicon-32x32.png",
        )
