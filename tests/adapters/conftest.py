"""Fixtures for the adapter suite: each behaviour test runs once per flavour."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from keyguard.plans import Plan
from tests.adapters.clients import Harness, MakeHarness
from tests.adapters.flavours import FLAVOURS
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
