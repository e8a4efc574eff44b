"""The hot path's builders make the same objects as their dataclasses' constructors
(``identity_of`` has its own, in ``test_decisions.py``)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import fields
from typing import Any

import pytest

from keyguard.decisions import Allow, Lease, allow_of, identity_of
from keyguard.limiting import HitRequest, LimitPolicy, Window, hit_request
from keyguard.request import RequestInfo, request_info

IDENTITY = identity_of(
    key_id="key_1",
    name="n",
    owner="o",
    scopes=("a:b",),
    plan="free",
    limits=(),
    client_ip="203.0.113.7",
    auth_method="header",
    service="a:b",
    units=2,
    charge=None,
)
POLICY = LimitPolicy(windows=(Window("minute", 60, 60),))
CASES: list[tuple[type[Any], Callable[..., Any], dict[str, Any]]] = [
    (
        RequestInfo,
        request_info,
        {
            "method": "GET",
            "path": "/v1/x",
            "headers": ((b"x-api-key", b"kg_live_x"),),
            "query_string": b"a=1",
            "peer": "203.0.113.7",
            "route_id": "/v1/{name}",
        },
    ),
    (HitRequest, hit_request, {"bucket": "key_1", "policy": POLICY, "cost": 3, "lease": "l1"}),
    (
        Allow,
        allow_of,
        {"identity": IDENTITY, "headers": ((b"a", b"b"),), "lease": Lease("k", "l"), "cost": 2},
    ),
]


@pytest.mark.parametrize(
    ("cls", "build", "values"), CASES, ids=lambda c: getattr(c, "__name__", "")
)
def test_a_builder_makes_what_its_class_makes(
    cls: type[Any], build: Callable[..., Any], values: dict[str, Any]
) -> None:
    """Every field, in the class's order, and an equal, equally hashed object."""
    assert list(inspect.signature(build).parameters) == [f.name for f in fields(cls)]
    built, constructed = build(**values), cls(**values)
    assert type(built) is cls
    assert built == constructed
    assert hash(built) == hash(constructed)
    assert repr(built) == repr(constructed)
