"""The reference server's app factory.

It mounts keyguard exactly as a user's own app would: settings from the
environment, routes that declare their scope with ``require(...)``, those
declarations compiled once into the guard's route rules (so a key without the scope
is refused before any limit is charged), the pure ASGI middleware, and the OAuth
token endpoint in front. ``uvicorn --factory reference_app:create_app`` works too.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TextIO

import httpx
from fastapi import APIRouter, FastAPI
from starlette.routing import BaseRoute

from keyguard import (
    AsyncKeyManager,
    KeyGuardError,
    KeyGuardSettings,
    build_guard,
    load_settings,
)
from keyguard.adapters.asgi import KeyGuardMiddleware
from keyguard.adapters.fastapi import declared_rules
from keyguard.alerts import Alerts
from keyguard.credentials import CredentialConfig
from keyguard.oauth import OAuthASGI, TokenEndpoint, TokenIssuer

from . import health
from .admin.routers import ROUTERS
from .body_limit import BodyLimit
from .catalogue import SERVICES
from .config import ServerSettings
from .context import Context
from .dashboard import PUBLIC_PATHS as DASHBOARD_PATHS
from .dashboard import install_dashboard
from .docs import install_docs
from .errors import install_error_handlers
from .first_run import first_run
from .providers import Providers
from .providers.offline import OfflineImages, OfflineSpeech, OfflineText
from .providers.upstream import Upstream
from .services import audio, chat, image, text

__all__ = ["PUBLIC", "create_app"]

_logger = logging.getLogger("reference_app")

PUBLIC = (
    "/healthz",
    "/readyz",
    "/docs",
    "/openapi.json",
    "/static/swagger-ui/*",
    *DASHBOARD_PATHS,  # the page and its files only; its data comes from /v1 with a key
)
OAUTH_ISSUER = "urn:keyguard:reference"
OAUTH_AUDIENCE = "urn:keyguard:reference:api"
SERVICE_ROUTERS = (text.router, image.router, audio.router, chat.router)
DESCRIPTION = """keyguard in front of AI service routes (offline stand-ins unless an
upstream is configured), with the key API. Every `/v1` route needs a key with the
scope its description names: send it as `X-API-Key`, as a bearer token, or trade it
for an access token at `POST /oauth/token`."""


def _providers(
    server: ServerSettings, transport: httpx.AsyncBaseTransport | None
) -> tuple[Providers, Upstream | None]:
    images = OfflineImages()
    if server.upstream_url is None:
        return Providers(OfflineText(), images, images, OfflineSpeech()), None
    key = None if server.upstream_key is None else server.upstream_key.get_secret_value()
    upstream = Upstream(
        server.upstream_url, key, timeout=server.provider_timeout, transport=transport
    )
    return Providers(upstream, upstream, images, OfflineSpeech()), upstream


async def _scan_keys(alerts: Alerts, manager: AsyncKeyManager, interval: float) -> None:
    """Look for expiring and expired keys now and every ``interval`` seconds: those
    alerts have no request to trigger them. A failed scan is logged and retried."""
    while True:
        try:
            await alerts.ascan(manager)
        except KeyGuardError as exc:  # a store that is down: try again next time
            _logger.warning("alert scan failed: %s", type(exc).__name__)
        await asyncio.sleep(interval)


def _routes(routers: list[APIRouter]) -> list[BaseRoute]:
    """The routers' own routes (``app.routes`` holds lazy wrappers in FastAPI 0.16x)."""
    return [route for router in routers for route in router.routes]


def create_app(
    settings: KeyGuardSettings | None = None,
    *,
    server: ServerSettings | None = None,
    host: str = "127.0.0.1",
    port: int | None = None,
    upstream_transport: httpx.AsyncBaseTransport | None = None,
    console: TextIO | None = None,
) -> FastAPI:
    """The server, configured by ``settings`` (default: ``load_settings()``) and
    ``server`` (default: ``ServerSettings()`` from ``KEYGUARD_*``).

    ``host``/``port`` only shape the first-run ``curl`` line; ``upstream_transport``
    and ``console`` are for tests.
    """
    settings = settings or load_settings()
    server = server or ServerSettings()
    keys = settings.open_store()
    # The operator's rules and webhook from KEYGUARD_ALERT_*; owners set their own
    # webhooks and thresholds at /v1/alerts/settings.
    alerts = Alerts(settings.alert_config())
    manager = AsyncKeyManager(
        keys,
        key_format=settings.key_format(),
        hasher=settings.hasher(),
        default_grace=settings.rotation_grace,
        actor="reference_app",
        on_event=alerts.key_changed,
    )
    credentials = CredentialConfig(
        methods=settings.credential_methods,
        header_name=settings.api_key_header,
        query_param=settings.query_param,
    )
    providers, upstream = _providers(server, upstream_transport)
    ctx = Context(settings, providers, manager, credentials)
    routers = [make(ctx) for make in (*SERVICE_ROUTERS, *ROUTERS)]
    # Tokens from POST /oauth/token are accepted wherever a key is. With several
    # workers, give TokenIssuer a shared signing_key, or each signs with its own.
    issuer = TokenIssuer(issuer=OAUTH_ISSUER, audience=OAUTH_AUDIENCE)
    declared = _routes(routers)
    rules = tuple(declared_rules(declared))
    guard = build_guard(
        settings,
        keys=keys,
        rules=rules,
        public=PUBLIC,
        tokens=issuer.validator(),
        services=SERVICES,
    )
    ctx.meter.bind(guard)
    ctx.guard = guard
    if guard.usage is not None:
        alerts.attach(guard.usage)
    where = f"http://{host}:{port or 8000}"

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await first_run(manager, where, default_plan=settings.default_plan, out=console)
        scans = asyncio.create_task(_scan_keys(alerts, manager, server.alert_scan_interval))
        try:
            yield
        finally:
            scans.cancel()
            if upstream is not None:
                await upstream.aclose()
            await keys.aclose()
            if guard.backends.limiter is not None:
                await guard.backends.limiter.aclose()
            await asyncio.to_thread(alerts.close, 1.0)

    app = FastAPI(
        title="keyguard reference server",
        version="0.1.0",
        description=DESCRIPTION,
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    for router in routers:
        app.include_router(router)
    app.include_router(health.router(guard))
    install_docs(app, declared)
    install_dashboard(app)
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=server.max_body_bytes)  # inside: after the key
    app.add_middleware(KeyGuardMiddleware, guard=guard)
    # Outermost: the token endpoint and its JWKS answer before the guard looks.
    app.add_middleware(OAuthASGI, endpoint=TokenEndpoint.from_guard(guard, issuer))
    app.state.guard = guard
    app.state.alerts = alerts
    return app
