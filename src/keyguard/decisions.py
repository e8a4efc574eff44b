"""What the guard decides: the values adapters act on and apps read.

Kept apart from :mod:`keyguard.guard` so that adapters and user code can import the
result types without the decision machinery.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

from .denials import Denial
from .limiting import LimitState

__all__ = ["Allow", "Decision", "Headers", "Identity", "Lease"]

Headers: TypeAlias = tuple[tuple[bytes, bytes], ...]


@dataclass(frozen=True, slots=True)
class Identity:
    """Who made an allowed request: published to the app, never holding the secret."""

    key_id: str
    name: str
    owner: str | None
    scopes: tuple[str, ...]
    plan: str
    limits: tuple[LimitState, ...]
    client_ip: str | None
    auth_method: str
    service: str | None = None


@dataclass(frozen=True, slots=True)
class Lease:
    """A concurrency slot to give back when the response ends."""

    bucket: str
    lease_id: str


@dataclass(frozen=True, slots=True)
class Allow:
    """Let the request through; ``identity`` is ``None`` on a public path."""

    identity: Identity | None
    headers: Headers = ()
    lease: Lease | None = None
    cost: int = 0


Decision: TypeAlias = Allow | Denial
