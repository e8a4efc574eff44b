"""The Flask extension: configuration, the decorator's placement, slots on errors."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from flask import Flask, g

from keyguard.adapters.flask import KeyGuardFlask, current_identity
from keyguard.credentials import CredentialConfig
from keyguard.errors import ConfigurationError
from keyguard.guard import Guard, Lease
from tests.adapters.clients import MakeHarness
from tests.adapters.flavours import Boom
from tests.adapters.world import World


@pytest.fixture
def world() -> Iterator[World]:
    """A fresh clock and stores, closed after the test."""
    made = World()
    yield made
    made.close()


def test_constructor_argument_wins_over_app_config(world: World) -> None:
    """A guard given to the constructor beats KEYGUARD['guard']; other keys still apply."""
    other = World()
    app = Flask(__name__)
    app.config["KEYGUARD"] = {"guard": other.guard(declared=True), "vary": False}
    KeyGuardFlask(app, guard=world.guard(declared=True))
    app.get("/v1/images")(lambda: "ok")
    key, _ = world.key("image:create")
    response = app.test_client().get("/v1/images", headers={"x-api-key": key})
    assert response.status_code == 200
    assert "Vary" not in response.headers
    other.close()


def test_app_factory_with_init_app(world: World) -> None:
    """An extension made without an app guards each app passed to init_app."""
    kg = KeyGuardFlask(guard=world.guard(declared=True))
    app = Flask(__name__)
    kg.init_app(app)
    app.get("/v1/images")(kg.require("image:create")(lambda: "ok"))
    assert app.test_client().get("/v1/images").status_code == 401


@pytest.mark.parametrize(
    ("config", "message"),
    [({"guard": None, "limit": 1}, "unknown"), ({}, "needs a guard")],
)
def test_bad_configuration_is_refused(config: dict[str, object], message: str) -> None:
    """Unknown KEYGUARD keys and a missing guard fail at init_app."""
    app = Flask(__name__)
    app.config["KEYGUARD"] = config
    with pytest.raises(ConfigurationError, match=message):
        KeyGuardFlask(app)


def test_require_above_the_route_decorator_still_checks_first(world: World) -> None:
    """The scope is enforced before limits even when require wraps the registered view."""
    app = Flask(__name__)
    kg = KeyGuardFlask(app, guard=world.guard(declared=True))

    @kg.require("text:generate")
    @app.post("/v1/generate")
    def generate() -> str:
        return "generated"

    key, key_id = world.key("image:create")
    before = world.limits(key_id)
    response = app.test_client().post("/v1/generate", headers={"x-api-key": key})
    assert response.status_code == 403
    assert response.get_json()["error"]["scope"] == "text:generate"
    assert world.limits(key_id) == before


def test_required_view_on_an_app_without_the_extension_refuses() -> None:
    """A view marked with require refuses with 401 when the extension is not on its app."""
    kg = KeyGuardFlask()
    app = Flask(__name__)
    app.get("/v1/images")(kg.require("image:create")(lambda: "served"))
    response = app.test_client().get("/v1/images")
    assert response.status_code == 401
    assert response.get_json()["error"]["code"] == "missing_api_key"


def test_identity_on_g_and_helper(world: World) -> None:
    """The view reads the caller from g.keyguard and current_identity() alike."""
    app = Flask(__name__)
    kg = KeyGuardFlask(app, guard=world.guard(declared=True))

    @app.get("/v1/images")
    @kg.require("image:create")
    def images() -> dict[str, object]:
        return {"same": g.keyguard is current_identity(), "id": g.keyguard.key_id}

    key, key_id = world.key("image:create")
    body = app.test_client().get("/v1/images", headers={"x-api-key": key}).get_json()
    assert body == {"same": True, "id": key_id}


def test_slot_released_when_the_exception_propagates(world: World) -> None:
    """With PROPAGATE_EXCEPTIONS the slot comes back in teardown, no response to close."""
    app = Flask(__name__)
    app.config["PROPAGATE_EXCEPTIONS"] = True
    KeyGuardFlask(app, guard=world.guard(declared=True))

    @app.get("/v1/boom")
    def boom() -> str:
        raise Boom("handler failed")

    key, key_id = world.key("image:create")
    for _ in range(3):
        with pytest.raises(Boom):
            app.test_client().get("/v1/boom", headers={"x-api-key": key})
        assert world.in_flight(key_id) == 0


def test_query_key_makes_the_response_private(world: World) -> None:
    """A key taken from the URL marks the response Cache-Control: private."""
    guard = Guard(
        keys=world.keys,
        limiter=world.limiter,
        credentials=CredentialConfig(methods=("query",)),
        plans={world.plan.name: world.plan},
        clock=world.clock,
    )
    app = Flask(__name__)
    KeyGuardFlask(app, guard=guard)
    app.get("/v1/images")(lambda: "ok")
    key, _ = world.key("image:create")
    response = app.test_client().get(f"/v1/images?api_key={key}")
    assert response.status_code == 200
    assert response.headers["Cache-Control"] == "private"


@pytest.mark.parametrize("path", ["/v1/images", "/v1/stream", "/v1/boom"])
def test_slot_released_exactly_once(
    make_harness: MakeHarness, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """Each admitted request gives its slot back once: on close, or on teardown after an error."""
    harness = make_harness("flask")
    guard: Guard = harness.app.extensions["keyguard"].guard
    released: list[Lease] = []
    monkeypatch.setattr(guard, "release", released.append)
    key, _ = harness.world.key("image:create")
    response = harness.request("GET", path, {"x-api-key": key})
    assert response.status_code == (500 if path == "/v1/boom" else 200)
    assert len(released) == 1
