"""Random header lists through every adapter: never a 500, never the key in the answer."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keyguard.plans import Plan
from tests.adapters.clients import Harness, MakeHarness
from tests.adapters.flavours import FLAVOURS

ROOMY = Plan("roomy", rate="100000/minute", concurrency=100)
ALLOWED = {200, 400, 401, 403, 429}
PLACEHOLDER = b"\x00KEY\x00"  # replaced by the harness's real key

NAMES = st.one_of(
    st.sampled_from(
        [b"x-api-key", b"authorization", b"X-Api-Key", b"x_api_key", b"x-forwarded-for", b"cookie"]
    ),
    st.binary(min_size=1, max_size=12),
)
VALUES = st.one_of(
    st.just(PLACEHOLDER),
    st.sampled_from([b"Bearer " + PLACEHOLDER, PLACEHOLDER + b",x", b"Bearer", b"Basic abc"]),
    st.binary(max_size=40),
    st.text(max_size=20).map(str.encode),  # non-ASCII, as UTF-8
    st.sampled_from([b"\r\n", b"\x00", b"\x7f\xff", b" \t ", b"kg_live_"]),
    st.integers(min_value=513, max_value=70_000).map(lambda n: b"A" * n),
)
HEADERS = st.lists(st.tuples(NAMES, VALUES), max_size=6)


@pytest.fixture(params=FLAVOURS)
def roomy(request: pytest.FixtureRequest, make_harness: MakeHarness) -> Harness:
    """A flavour whose limits rarely bite and that never blocks an address."""
    flavour: str = request.param
    return make_harness(flavour, plan=ROOMY, auth_failures=0)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(headers=HEADERS)
def test_random_headers_never_500_nor_echo_the_key(
    roomy: Harness, headers: list[tuple[bytes, bytes]]
) -> None:
    """Whatever the headers, the answer is 200/400/401/403/429 and holds no raw key."""
    key = roomy.world.key("image:create")[0].encode()
    sent = [(name, value.replace(PLACEHOLDER, key)) for name, value in headers]
    response = roomy.request("GET", "/v1/images", sent)
    assert response.status_code in ALLOWED
    assert key not in response.content
    assert all(key not in value for _, value in response.headers.raw)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_micro_sign_header_name(make_harness: MakeHarness, flavour: str) -> None:
    """A header named with the latin-1 micro sign is ignored like any unknown header."""
    response = make_harness(flavour).request("GET", "/v1/images", [(b"\xb5", b"x")])
    assert response.status_code == 401
