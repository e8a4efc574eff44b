"""Fixtures for the adapter suite: each behaviour test runs once per flavour."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from keyguard.plans import Plan
from tests.adapters.clients import Harness, MakeHarness
from tests.adapters.flavours import FLAVOURS
from tests.adapters.security_support import BACKENDS, FACES, Env, Front
from tests.adapters.world import PLAN, World


@pytest.fixture
def make_harness() -> Iterator[MakeHarness]:
    """A factory of harnesses, each with its own clock, stores and client."""
    built: list[Harness] = []

    def make(flavour: str, *, plan: Plan = PLAN, auth_failures: int = 20) -> Harness:
        harness = Harness(flavour, World(plan=plan, auth_failures=auth_failures))
        built.append(harness)
        return harness

    yield make
    for harness in built:
        harness.close()


@pytest.fixture(params=FLAVOURS)
def harness(request: pytest.FixtureRequest, make_harness: MakeHarness) -> Harness:
    """The app in each of the five flavours, in turn."""
    flavour: str = request.param
    return make_harness(flavour)


# The security catalogue's environments (tests/adapters/test_security_*.py).


@pytest.fixture(params=BACKENDS)
def env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Env]:
    """Guard, stores and recording app on the memory or the SQLite backends."""
    environment = Env(request.param, tmp_path)
    yield environment
    environment.close()


@pytest.fixture(params=FACES)
def face(request: pytest.FixtureRequest) -> str:
    """Which middleware the request goes through: raw ASGI or raw WSGI."""
    return str(request.param)


@pytest.fixture
def front(env: Env, face: str) -> Front:
    """The environment seen through one face."""
    return env.front(face)
