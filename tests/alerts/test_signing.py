"""Webhook signatures: Stripe-style, timestamped, verified in constant time."""

from __future__ import annotations

import hashlib
import hmac
import time
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from keyguard.alerts import signature_header, verify_signature
from keyguard.alerts.signing import sign

from .conftest import SECRET

NOW = 1_800_000_000
BODY = b'{"id":"evt_1","kind":"key.revoked"}'


def test_header_format_and_hmac() -> None:
    """The header is t=<unix>,v1=<hex HMAC-SHA256 of "<t>.<body>">."""
    header = signature_header(SECRET, BODY, timestamp=NOW)
    expected = hmac.new(SECRET.encode(), f"{NOW}.".encode() + BODY, hashlib.sha256).hexdigest()
    assert header == f"t={NOW},v1={expected}"
    assert verify_signature(SECRET, header, BODY, now=NOW)
    assert verify_signature(SECRET.encode(), header, BODY, now=NOW + 299)


def test_stale_and_future_timestamps_are_refused() -> None:
    """A replay older than the tolerance (or from the future) fails."""
    header = signature_header(SECRET, BODY, timestamp=NOW)
    assert not verify_signature(SECRET, header, BODY, now=NOW + 301)
    assert not verify_signature(SECRET, header, BODY, now=NOW - 301)
    assert verify_signature(SECRET, header, BODY, tolerance=600, now=NOW + 301)


def test_wrong_secret_body_or_garbage_fails() -> None:
    """Any change to the secret or body, and malformed headers, fail closed."""
    header = signature_header(SECRET, BODY, timestamp=NOW)
    assert not verify_signature("another-secret-0123456789", header, BODY, now=NOW)
    assert not verify_signature(SECRET, header, BODY + b" ", now=NOW)
    for bad in (
        None,
        "",
        "garbage",
        f"t={NOW}",
        "v1=abc",
        f"t={NOW},t={NOW},v1={sign(SECRET, NOW, BODY)}",
        f"t=-{NOW},v1={sign(SECRET, NOW, BODY)}",
        f"t=\uff11\uff12,v1={sign(SECRET, NOW, BODY)}",  # fullwidth digits
        f"t={NOW},v1=é",
        "t=1," + "v1=0," * 2000,
    ):
        assert not verify_signature(SECRET, bad, BODY, now=NOW)


def test_any_of_several_signatures_is_accepted() -> None:
    """During secret rotation a header may carry one v1 per secret."""
    old, new = "old-secret-0123456789", "new-secret-0123456789"
    header = f"t={NOW},v1={sign(old, NOW, BODY)},v1={sign(new, NOW, BODY)}"
    assert verify_signature(old, header, BODY, now=NOW)
    assert verify_signature(new, header, BODY, now=NOW)
    assert verify_signature(old, f"{header},v0=ignored", BODY, now=NOW)  # unknown schemes


@given(body=st.binary(max_size=200), other=st.binary(max_size=200))
def test_a_signature_verifies_only_its_own_body(body: bytes, other: bytes) -> None:
    """Verification accepts exactly the signed body."""
    header = signature_header(SECRET, body, timestamp=NOW)
    assert verify_signature(SECRET, header, body, now=NOW)
    assert verify_signature(SECRET, header, other, now=NOW) == (other == body)


def test_the_standard_library_receiver_in_the_docs_agrees() -> None:
    """The stand-alone verify() shown in docs/alerts.md accepts keyguard's signatures
    and refuses stale or altered ones."""
    text = (Path(__file__).parents[2] / "docs" / "alerts.md").read_text()
    block = next(b for b in text.split("```python")[1:] if "def verify(" in b)
    namespace: dict[str, Any] = {}
    exec(block.split("```")[0], namespace)
    verify = namespace["verify"]
    header = signature_header(SECRET, BODY)
    assert verify(SECRET, header, BODY)
    assert not verify(SECRET, header, BODY + b"x")
    assert not verify("another-secret-0123456789", header, BODY)
    assert not verify(SECRET, signature_header(SECRET, BODY, int(time.time()) - 400), BODY)
    assert not verify(SECRET, "garbage", BODY)
