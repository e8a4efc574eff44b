"""What every adapter computes the same way from a guard."""

from __future__ import annotations

from ..guard import Guard

__all__ = ["vary_headers"]


def vary_headers(guard: Guard, vary: bool) -> list[tuple[bytes, bytes]]:
    """``Vary`` on the credential headers, so shared caches key responses on the caller."""
    if not vary:
        return []
    return [(b"vary", b"authorization, " + guard.credentials.header_name.encode("ascii"))]
