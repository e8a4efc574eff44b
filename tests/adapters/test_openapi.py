"""The OpenAPI document of a FastAPI app that declares scopes with ``require``."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, FastAPI, Security

from keyguard.adapters.fastapi import require
from keyguard.credentials import CredentialConfig
from keyguard.guard import Identity
from tests.adapters.clients import MakeHarness

QUERY_ONLY = require(
    "text:generate", credentials=CredentialConfig(methods=("query",), query_param="key")
)
OWN_HEADER = require(credentials=CredentialConfig(header_name="x-key"))
BOTH = [{"APIKeyHeader": ["text:generate"]}, {"HTTPBearer": ["text:generate"]}]


def test_openapi_has_key_schemes_and_route_scope(make_harness: MakeHarness) -> None:
    """/openapi.json declares the header and bearer schemes and each route's scope."""
    document = make_harness("fastapi").request("GET", "/openapi.json").json()
    schemes = document["components"]["securitySchemes"]
    assert schemes["APIKeyHeader"] == {"type": "apiKey", "in": "header", "name": "X-API-Key"}
    assert schemes["HTTPBearer"] == {"type": "http", "scheme": "bearer"}
    assert "APIKeyQuery" not in schemes
    assert document["paths"]["/v1/generate"]["post"]["security"] == BOTH
    images = document["paths"]["/v1/images"]["get"]["security"]
    assert images == [{"APIKeyHeader": ["image:create"]}, {"HTTPBearer": ["image:create"]}]
    assert document["paths"]["/v1/stream"]["get"]["security"] == [
        {"APIKeyHeader": []},
        {"HTTPBearer": []},
    ]
    assert "security" not in document["paths"]["/health"]["get"]


def test_openapi_shows_query_scheme_only_when_enabled() -> None:
    """The query scheme, with the configured parameter name, appears only when query auth is on."""
    app = FastAPI()

    @app.get("/q")
    async def q(
        caller: Annotated[Identity, Depends(QUERY_ONLY)],
    ) -> None:
        """Query auth only."""

    document: dict[str, Any] = app.openapi()
    schemes = document["components"]["securitySchemes"]
    assert schemes == {"APIKeyQuery": {"type": "apiKey", "in": "query", "name": "key"}}
    assert document["paths"]["/q"]["get"]["security"] == [{"APIKeyQuery": ["text:generate"]}]


def test_scope_kept_under_the_other_wrapper() -> None:
    """``Security(require(...))`` documents the same requirement as ``Depends``."""
    app = FastAPI()

    @app.post("/v1/generate")
    async def generate(caller: Annotated[Identity, Security(require("text:generate"))]) -> None:
        """Scoped with Security."""

    assert app.openapi()["paths"]["/v1/generate"]["post"]["security"] == BOTH


def test_custom_header_name_is_documented() -> None:
    """A deployment's own key header is the name the Authorize dialog asks for."""
    app = FastAPI()

    @app.get("/k")
    async def k(caller: Annotated[Identity, Depends(OWN_HEADER)]) -> None:
        """Any valid key."""

    schemes = app.openapi()["components"]["securitySchemes"]
    assert schemes["APIKeyHeader"]["name"] == "X-Key"
