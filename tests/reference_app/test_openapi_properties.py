"""Property tests of the API against its own OpenAPI schema (schemathesis).

Every operation gets generated requests, valid and invalid, with the admin key and
with the demo key; none may answer 5xx, an undocumented status, or a body that
violates the documented schema. Bounded: about two hundred cases in all.
"""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from .conftest import Server

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
EXAMPLES_PER_OPERATION = 6


def _operations(server: Server) -> list[Any]:
    schema = schemathesis.openapi.from_asgi("/openapi.json", server.client.app)
    operations = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result
        operations.append(result.ok())
    return operations


def test_openapi_documents_every_route_with_its_scope(server: Server) -> None:
    """Each /v1 operation names its scope; the key schemes and OAuth are declared."""
    spec = server.call("GET", "/openapi.json").json()
    schemes = spec["components"]["securitySchemes"]
    assert {"APIKeyHeader", "HTTPBearer", "oauth2"} <= set(schemes)
    assert schemes["oauth2"]["flows"]["clientCredentials"]["tokenUrl"] == "/oauth/token"
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            if path.startswith("/v1"):
                assert operation["x-keyguard-scope"], (method, path)
                assert "Requires the scope" in operation["description"]
                assert "429" in operation["responses"]
            assert "422" not in operation["responses"]


def test_docs_work_offline(server: Server) -> None:
    """/docs loads Swagger UI from the server itself, with no CDN."""
    page = server.call("GET", "/docs").text
    assert "/static/swagger-ui/swagger-ui-bundle.js" in page
    assert "cdn" not in page.lower()
    bundle = server.call("GET", "/static/swagger-ui/swagger-ui-bundle.js")
    assert bundle.status_code == 200
    assert len(bundle.content) > 100_000


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_operation_answers_5xx_or_off_schema(server: Server, mode: GenerationMode) -> None:
    """Generated requests, valid or not, get documented answers and never a 5xx."""
    operations = _operations(server)
    strategy = st.one_of([op.as_strategy(generation_mode=mode) for op in operations])
    keys = st.sampled_from([server.admin, server.demo])

    @settings(
        max_examples=EXAMPLES_PER_OPERATION * len(operations) // 2,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
    )
    @given(case=strategy, key=keys)
    def run(case: Any, key: str) -> None:
        case.call_and_validate(headers={"X-API-Key": key}, checks=CHECKS)

    run()
