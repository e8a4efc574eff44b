"""Units after the fact: settle an admission to what the request really used.

The guard charges a service's cost when it admits a request (see
:mod:`reference_app.catalogue`); a text or chat request then settles to its real
token count when its response or stream ends, and a provider failure settles to
zero, a full refund. Both go through keyguard's public ``Guard.asettle``, which
applies once per admission however often it is called.
"""

from __future__ import annotations

from keyguard import Guard, Identity

__all__ = ["Meter"]


class Meter:
    """Settles admissions on one guard; bound once the guard exists."""

    def __init__(self) -> None:
        self._guard: Guard | None = None

    def bind(self, guard: Guard) -> None:
        self._guard = guard

    async def settle(self, identity: Identity | None, used: int) -> None:
        """Settle ``identity``'s admission to ``used`` units (0 refunds it all)."""
        if identity is None or self._guard is None:
            return
        await self._guard.asettle(identity, used)

    async def refund(self, identity: Identity | None) -> None:
        """Give back everything the admission charged: the work was not done."""
        await self.settle(identity, 0)
