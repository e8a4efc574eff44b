"""Units reserved up front and settled after the fact.

The guard charges a service's cost when it admits a request (see
:mod:`reference_app.catalogue`). A text or chat request, once its body is read,
reserves the most it may cost (its prompt and ``max_tokens``) through keyguard's
``Guard.areserve``: a key whose quota cannot hold that is refused with 429 before
any work is done. It then settles to its real token count when its response or
stream ends, and a provider failure settles to zero, a full refund, through
``Guard.asettle``, which applies once per admission however often it is called.
"""

from __future__ import annotations

from keyguard import Guard, Identity
from keyguard.denials import Denial

__all__ = ["Meter", "Refused"]


class Refused(Exception):
    """A reservation keyguard refused; answered exactly as the guard's own refusals."""

    def __init__(self, denial: Denial) -> None:
        super().__init__(denial.code)
        self.denial = denial


class Meter:
    """Settles admissions on one guard; bound once the guard exists."""

    def __init__(self) -> None:
        self._guard: Guard | None = None

    def bind(self, guard: Guard) -> None:
        self._guard = guard

    async def reserve(self, identity: Identity | None, most: int) -> None:
        """Hold ``most`` units for this request in all (admission included), or refund
        the admission and raise :class:`Refused` when the key's quotas cannot hold them."""
        if identity is None or self._guard is None:
            return
        denial = await self._guard.areserve(identity, max(0, most - identity.units))
        if denial is not None:
            await self.refund(identity)  # no work was done: the admission's units too
            raise Refused(denial)

    async def settle(self, identity: Identity | None, used: int) -> None:
        """Settle ``identity``'s admission to ``used`` units (0 refunds it all)."""
        if identity is None or self._guard is None:
            return
        await self._guard.asettle(identity, used)

    async def refund(self, identity: Identity | None) -> None:
        """Give back everything the admission charged: the work was not done."""
        await self.settle(identity, 0)
