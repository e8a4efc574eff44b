"""Reserve and settle: units the guard's admissions charged, taken or given back later.

A mixin of :class:`~keyguard.guard.Guard`, kept apart because none of it runs in the
decision itself: an app calls these after admission, when it knows what a request
really costs (see ``docs/enforcement.md``, "Reserving and settling units").
"""

from __future__ import annotations

import asyncio
import logging
from typing import Literal

from ._guard_ops import Backends
from ._guard_support import refusal
from .decisions import Identity
from .denials import Denial, deny
from .errors import StorageError
from .limiting import Adjustment, HitRequest, QuotaAdjuster
from .telemetry import Telemetry

__all__ = ["RETRY_WHEN_DOWN", "Settlements"]

RETRY_WHEN_DOWN = 5.0
_logger = logging.getLogger("keyguard")


class Settlements:
    """The guard's reserve and settle methods (see :class:`~keyguard.guard.Guard`)."""

    backends: Backends
    telemetry: Telemetry | None
    inline: bool
    on_limiter_error: Literal["deny", "allow"]

    def reserve(self, identity: Identity, units: int) -> Denial | None:
        """Charge ``units`` more to the quotas the admission of ``identity`` charged,
        refusing when they do not fit: the way to reserve a cost known only once the
        app has read the request (``max_tokens`` from a JSON body).

        Atomic like an admission: all the quotas take the units, or none does and the
        answer is a ``quota_exceeded`` :class:`~keyguard.denials.Denial` (with limit
        headers) for the app to send. The units join the identity's charge, so a later
        :meth:`settle` gives back whatever was reserved beyond what was used. ``None``
        means reserved, or nothing to reserve against (no quotas, no limiter, a limiter
        that failed open); a limit store that fails answers as ``on_limiter_error``
        says (503 ``limiter_unavailable`` by default).

        :raises ValueError: if ``units`` is not a whole number >= 0.
        """
        request = self._reservation(identity, units)
        if request is None or self.backends.limiter is None:
            return None
        limiter = self.backends.limiter
        try:
            admission = limiter.hit(request)
            if not admission.allowed:
                return refusal(admission, ())
            late = self._late(identity, units)
            if late is not None and isinstance(limiter, QuotaAdjuster):
                limiter.adjust(late)
        except StorageError:
            return self._reserve_failed()
        return None

    async def areserve(self, identity: Identity, units: int) -> Denial | None:
        """The async :meth:`reserve`."""
        if self.inline:
            return self.reserve(identity, units)
        request = self._reservation(identity, units)
        if request is None or self.backends.limiter is None:
            return None
        limiter = self.backends.limiter
        try:
            admission = await limiter.ahit(request)
            if not admission.allowed:
                return refusal(admission, ())
            late = self._late(identity, units)
            if late is not None and isinstance(limiter, QuotaAdjuster):
                await limiter.aadjust(late)
        except StorageError:
            return self._reserve_failed()
        return None

    @staticmethod
    def _reservation(identity: Identity, units: int) -> HitRequest | None:
        if isinstance(units, bool) or not isinstance(units, int) or units < 0:
            raise ValueError("units must be a whole number >= 0")
        charge = identity.charge
        if charge is None or units == 0 or charge.spent:
            return None
        return HitRequest(charge.bucket, charge.quotas, units)

    @staticmethod
    def _late(identity: Identity, units: int) -> Adjustment | None:
        """Add the reserved units to the charge; if it was settled meanwhile (by
        another task), the adjustment that hands them straight back."""
        charge = identity.charge
        if charge is None or charge.add(units):
            return None
        return Adjustment(charge.bucket, charge.charges(), -units)

    def _reserve_failed(self) -> Denial | None:
        if self.telemetry is not None:
            self.telemetry.storage_error("limits")
        if self.on_limiter_error == "deny":
            return deny("limiter_unavailable", retry_after=RETRY_WHEN_DOWN)
        return None

    def settle(self, identity: Identity, used: int) -> None:
        """Settle what the admission of ``identity`` reserved to the ``used`` units.

        An app that cannot know a request's cost up front (tokens, say) reserves the
        most it may cost at admission, ``check(request, cost=max_tokens)``, and settles
        to the real count when the response or stream ends: ``charged - used`` goes
        back to every quota the admission charged (the key's and the service's, in the
        UTC day or month it charged, never the next one), or the extra is charged when
        ``used`` is larger, never refusing (the work is done; the quota may then read
        over its limit, its ``remaining`` clamped at 0). Give ``used=0`` to refund the
        whole reservation, after a provider error say. Windows count requests, not
        units, and are left alone.

        **Once per admission**: the identity carries a single-use handle
        (:class:`~keyguard.decisions.Charge`), and only the first settlement of it
        applies, whichever thread or task calls; later calls do nothing. An identity
        with nothing to settle (no quota charged, no limiter, or a limiter that
        failed open) is a no-op. A limit store that fails is logged and counted,
        never raised: the response is served; the reservation then stands.

        :raises ValueError: if ``used`` is not a whole number >= 0.

        .. versionadded:: 0.1
        """
        adjustment = self._settlement(identity, used)
        if adjustment is None or self.backends.limiter is None:
            return
        if not isinstance(self.backends.limiter, QuotaAdjuster):
            self._settle_failed(None)
            return
        try:
            self.backends.limiter.adjust(adjustment)
        except StorageError as exc:
            self._settle_failed(exc)

    async def asettle(self, identity: Identity, used: int) -> None:
        """The async :meth:`settle`, safe to call from any task.

        The store call is shielded: an app whose task is cancelled (a client that went
        away mid-stream) still settles, and the cancellation goes on afterwards.
        """
        if self.inline:
            self.settle(identity, used)
            return
        adjustment = self._settlement(identity, used)
        limiter = self.backends.limiter
        if adjustment is None or limiter is None:
            return
        if not isinstance(limiter, QuotaAdjuster):
            self._settle_failed(None)
            return

        async def adjust() -> None:
            try:
                await limiter.aadjust(adjustment)
            except StorageError as exc:
                self._settle_failed(exc)

        task = asyncio.ensure_future(adjust())
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            await task
            raise

    @staticmethod
    def _settlement(identity: Identity, used: int) -> Adjustment | None:
        """The adjustment settling ``identity``, or ``None`` when there is none to make;
        spends the identity's handle."""
        if isinstance(used, bool) or not isinstance(used, int) or used < 0:
            raise ValueError("used must be a whole number of units >= 0")
        charge = identity.charge
        if charge is None or not charge.spend():
            return None
        charge.settled = used  # what usage records as the request's units
        if used == charge.units:
            return None
        return charge.adjustment(used)

    def _settle_failed(self, exc: StorageError | None) -> None:
        if exc is None:  # a custom limiter without QuotaAdjuster: cannot settle
            _logger.warning("keyguard's limiter cannot settle units (no QuotaAdjuster)")
        else:  # the type only: a message may hold request data
            _logger.warning("keyguard could not settle units: %s", type(exc).__name__)
        if self.telemetry is not None:
            self.telemetry.storage_error("limits")
