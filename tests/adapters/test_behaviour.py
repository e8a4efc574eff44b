"""What every adapter does, written once and run against all five flavours."""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import pytest

from tests.adapters.clients import Harness, MakeHarness
from tests.adapters.flavours import CHUNKS, FLAVOURS

LIMIT_HEADERS = (
    "ratelimit",
    "ratelimit-policy",
    "x-ratelimit-limit",
    "x-ratelimit-remaining",
    "x-ratelimit-reset",
)


def error_of(response: httpx.Response) -> dict[str, object]:
    payload = response.json()
    assert set(payload) == {"error"}
    error: dict[str, object] = payload["error"]
    return error


def assert_limit_headers(response: httpx.Response) -> None:
    for name in LIMIT_HEADERS:
        assert name in response.headers, name


def test_missing_key_is_401_with_challenge(harness: Harness) -> None:
    """A request without a key gets 401, a WWW-Authenticate challenge and no-store."""
    response = harness.request("POST", "/v1/generate")
    assert response.status_code == 401
    assert error_of(response)["code"] == "missing_api_key"
    assert response.headers["www-authenticate"].startswith('Bearer realm="api"')
    assert response.headers["cache-control"] == "no-store"
    assert harness.world.calls == []


@pytest.mark.parametrize("style", ["header", "bearer"])
def test_valid_key_is_admitted_with_limit_headers(harness: Harness, style: str) -> None:
    """A key with the route's scope, in X-API-Key or as a bearer token, gets 200 and limit state."""
    key, _ = harness.world.key("image:create")
    headers = {"x-api-key": key} if style == "header" else {"authorization": f"Bearer {key}"}
    response = harness.request("GET", "/v1/images", headers)
    assert response.status_code == 200
    assert_limit_headers(response)
    assert response.headers["x-ratelimit-limit"] == "5"
    assert response.headers["x-ratelimit-remaining"] == "4"
    assert harness.world.calls == ["/v1/images"]


def test_wrong_scope_is_403_and_charges_nothing(harness: Harness) -> None:
    """A key without the route's scope gets 403 naming it; no limit is charged, no handler runs."""
    key, key_id = harness.world.key("image:create")
    before = harness.world.limits(key_id)
    response = harness.request("POST", "/v1/generate", {"x-api-key": key})
    assert response.status_code == 403
    error = error_of(response)
    assert error["code"] == "insufficient_permissions"
    assert error["scope"] == "text:generate"
    assert 'scope="text:generate"' in response.headers["www-authenticate"]
    assert harness.world.limits(key_id) == before
    assert harness.world.calls == []


def test_public_path_needs_no_key(harness: Harness) -> None:
    """A public path is served without a key and without limit headers."""
    response = harness.request("GET", "/health")
    assert response.status_code == 200
    assert response.json() == {"key_id": None}
    assert "ratelimit" not in response.headers


def test_exceeding_the_limit_is_429_with_retry_after(harness: Harness) -> None:
    """The sixth request in a 5-per-second window gets 429 with Retry-After and limit state."""
    key, _ = harness.world.key("image:create")
    statuses = [
        harness.request("GET", "/v1/images", {"x-api-key": key}).status_code for _ in range(5)
    ]
    refused = harness.request("GET", "/v1/images", {"x-api-key": key})
    assert statuses == [200] * 5
    assert refused.status_code == 429
    assert error_of(refused)["code"] == "rate_limit_exceeded"
    assert refused.headers["retry-after"] == "1"
    assert refused.headers["x-ratelimit-remaining"] == "0"
    assert_limit_headers(refused)
    assert len(harness.world.calls) == 5


def test_time_passing_admits_again(harness: Harness) -> None:
    """After Retry-After seconds on the injected clock, the key is admitted again."""
    key, _ = harness.world.key("image:create")
    for _ in range(6):
        harness.request("GET", "/v1/images", {"x-api-key": key})
    harness.world.clock.advance(1)
    assert harness.request("GET", "/v1/images", {"x-api-key": key}).status_code == 200


SECOND_CREDENTIAL = {"bearer": (b"authorization", b"Bearer "), "key-header": (b"x-api-key", b"")}


@pytest.mark.parametrize("second", SECOND_CREDENTIAL)
def test_two_credentials_are_400(harness: Harness, second: str) -> None:
    """A request carrying two credentials is refused with 400 and charges nothing."""
    key, key_id = harness.world.key("image:create")
    name, prefix = SECOND_CREDENTIAL[second]
    headers = [(b"x-api-key", key.encode()), (name, prefix + key.encode())]
    before = harness.world.limits(key_id)
    response = harness.request("GET", "/v1/images", headers)
    assert response.status_code == 400
    assert error_of(response)["code"] == "invalid_request"
    assert harness.world.limits(key_id) == before
    assert harness.world.calls == []


def test_handler_sees_identity_but_never_the_secret(harness: Harness) -> None:
    """The handler gets the key's id, name and scopes, and nothing that holds the secret."""
    key, key_id = harness.world.key("image:create", "text:generate")
    response = harness.request("POST", "/v1/generate", {"x-api-key": key})
    assert response.status_code == 200
    seen = response.json()
    assert seen["key_id"] == key_id
    assert seen["name"] == "test key"
    assert seen["scopes"] == ["image:create", "text:generate"]
    assert key not in seen["seen"]
    assert key.encode() not in response.content


def test_streaming_response_passes_through(harness: Harness) -> None:
    """A multi-chunk streamed body arrives whole, with the limit headers, and frees its slot."""
    key, key_id = harness.world.key("image:create")
    response = harness.request("GET", "/v1/stream", {"x-api-key": key})
    assert response.status_code == 200
    assert response.content == b"".join(CHUNKS)
    assert_limit_headers(response)
    assert harness.world.in_flight(key_id) == 0


@pytest.mark.parametrize("path", ["/v1/images", "/v1/boom", "/v1/stream"])
def test_concurrency_slot_is_released(harness: Harness, path: str) -> None:
    """The key's concurrency slot comes back after a success, a handler exception or a stream."""
    key, key_id = harness.world.key("image:create")
    for _ in range(3):  # more than the cap of 2: a leaked slot would refuse the third
        response = harness.request("GET", path, {"x-api-key": key})
        assert response.status_code == (500 if path == "/v1/boom" else 200)
        assert harness.world.in_flight(key_id) == 0


SITUATIONS: dict[str, Callable[[str], dict[str, str]]] = {
    "missing key": lambda key: {},
    "wrong scope": lambda key: {"x-api-key": key},
    "unknown key": lambda key: {"x-api-key": "kg_live_" + "A" * 38},
    "two credentials": lambda key: {"x-api-key": key, "authorization": f"Bearer {key}"},
}


@pytest.mark.parametrize("situation", [*SITUATIONS, "rate limited"])
def test_refusals_are_byte_identical_across_flavours(
    make_harness: MakeHarness, situation: str
) -> None:
    """The same refusal has the same status and the same body bytes in every flavour."""
    answers = {}
    for flavour in FLAVOURS:
        harness = make_harness(flavour)
        key, _ = harness.world.key("image:create")
        if situation == "rate limited":
            for _ in range(5):
                harness.request("GET", "/v1/images", {"x-api-key": key})
            response = harness.request("GET", "/v1/images", {"x-api-key": key})
        else:
            response = harness.request("POST", "/v1/generate", SITUATIONS[situation](key))
        answers[flavour] = (response.status_code, response.content)
    assert len(set(answers.values())) == 1, answers
    status, body = answers["asgi"]
    assert status >= 400
    assert json.loads(body)["error"]["code"]
