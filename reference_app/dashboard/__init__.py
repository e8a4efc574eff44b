"""``/dashboard``: a single-page app over the server's own public API.

Every asset ships in this package (``static/``): vanilla JavaScript modules and one
stylesheet, no framework, no CDN, no build step. The page calls the same ``/v1``
routes any client calls, with the signed-in key as a bearer token kept in the tab's
``sessionStorage``; it has no route of its own besides its files, so it can do
nothing the key could not do with ``curl``.

**Security note**: the files are served from an allow-list read once at start-up
(no path from the request reaches the file system), and every answer carries a
strict Content-Security-Policy (``'self'`` only: no inline script or style, no
other origin), ``nosniff`` and ``Referrer-Policy: no-referrer``; the HTML is never
cached.
"""

from __future__ import annotations

import hashlib
import mimetypes
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse, Response

__all__ = ["ASSETS", "CSP", "PUBLIC_PATHS", "install_dashboard"]

ASSETS = Path(__file__).parent / "static"
PUBLIC_PATHS = ("/dashboard", "/dashboard/*")
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
_SECURITY = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}
_NOT_FOUND = b'{"error":{"code":"not_found","message":"Not found.","type":"invalid_request_error"}}'
_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".html": "text/html; charset=utf-8",
    ".svg": "image/svg+xml",
}


@dataclass(frozen=True, slots=True)
class _Asset:
    body: bytes
    media_type: str
    etag: str


def _load(directory: Path) -> dict[str, _Asset]:
    assets = {}
    for path in sorted(directory.iterdir()):
        if not path.is_file() or path.name.startswith("."):
            continue
        body = path.read_bytes()
        media = _TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0]
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        assets[path.name] = _Asset(body, media or "application/octet-stream", etag)
    return assets


def _answer(asset: _Asset, request: Request, cache: str) -> Response:
    headers = {**_SECURITY, "Cache-Control": cache, "ETag": asset.etag}
    if request.headers.get("if-none-match") == asset.etag:
        return Response(status_code=304, headers=headers)
    return Response(asset.body, media_type=asset.media_type, headers=headers)


def install_dashboard(app: FastAPI, directory: Path = ASSETS) -> None:
    """Serve ``index.html`` at ``/dashboard`` and the other files at
    ``/dashboard/<name>``; add :data:`PUBLIC_PATHS` to the guard's public paths."""
    assets = _load(directory)
    page = assets.pop("index.html")

    @app.api_route("/dashboard", methods=["GET", "HEAD"], include_in_schema=False)
    async def dashboard(request: Request) -> Response:
        return _answer(page, request, "no-store")

    @app.get("/dashboard/", include_in_schema=False)
    async def slash() -> Response:
        return RedirectResponse("/dashboard", status_code=308)

    @app.api_route("/dashboard/{name}", methods=["GET", "HEAD"], include_in_schema=False)
    async def asset(name: str, request: Request) -> Response:
        found = assets.get(name)
        if found is None:
            return Response(_NOT_FOUND, 404, _SECURITY, "application/json")
        # Revalidated on each load (cheap with the ETag), so an upgrade is never stale.
        return _answer(found, request, "no-cache")
