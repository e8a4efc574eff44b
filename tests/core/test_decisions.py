"""The decision values: the guard's fast Identity constructor builds what the class does."""

from __future__ import annotations

import inspect
from dataclasses import fields

from hypothesis import given
from hypothesis import strategies as st

from keyguard.decisions import Identity, identity_of
from keyguard.limiting import LimitKind, LimitState

_text = st.text(max_size=20)
_optional = st.none() | _text
_limits = st.lists(
    st.builds(
        LimitState,
        _text,
        st.sampled_from(list(LimitKind)),
        st.integers(0, 10**6),
        st.integers(0, 10**6),
        st.floats(0, 10**6),
        st.none() | st.integers(1, 10**6),
    ),
    max_size=4,
).map(tuple)


def test_identity_of_takes_every_field_of_identity() -> None:
    """A field added to Identity must be added to identity_of too, or this fails."""
    assert list(inspect.signature(identity_of).parameters) == [f.name for f in fields(Identity)]


@given(
    key_id=_text,
    name=_text,
    owner=_optional,
    scopes=st.lists(_text, max_size=3).map(tuple),
    plan=_text,
    limits=_limits,
    client_ip=_optional,
    auth_method=_text,
    service=_optional,
    units=st.integers(0, 10**9),
)
def test_identity_of_builds_what_identity_builds(**values: object) -> None:
    built = identity_of(**values, charge=None)  # type: ignore[arg-type]
    assert built == Identity(**values)  # type: ignore[arg-type]
    assert repr(built) == repr(Identity(**values))  # type: ignore[arg-type]
    assert hash(built) == hash(Identity(**values))  # type: ignore[arg-type]
