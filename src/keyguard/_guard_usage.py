"""Usage reports of the guard: each allowed response, and each refusal of a proved key.

A mixin of :class:`~keyguard.guard.Guard`: the adapters call :meth:`finished` when a
response ends, the guard itself reports refusals; both build one
:class:`~keyguard.usage.UsageEvent` and queue it (see :mod:`keyguard.usage`).
"""

from __future__ import annotations

import itertools
import time

from ._guard_support import ip_text, safe_request_id
from .clock import Clock
from .decisions import Allow
from .denials import Denial
from .proxies import TrustedProxies
from .request import RequestInfo
from .usage.recorder import UsageRecorder
from .usage.records import UsageEvent

__all__ = ["UsageReports"]


class UsageReports:
    """The guard's usage reporting (see :class:`~keyguard.guard.Guard`)."""

    usage: UsageRecorder | None
    clock: Clock
    proxies: TrustedProxies
    _lease_prefix: str
    _request_ids: itertools.count[int]

    def finished(self, request: RequestInfo, allow: Allow, status: int, started: float) -> None:
        """Record an allowed request whose response ended with ``status``.

        ``started`` is the ``time.perf_counter()`` reading taken before the check, so
        the latency covers keyguard and the app. Adapters call this once per response;
        a request on a public path (no identity) records nothing.
        """
        usage, identity = self.usage, allow.identity
        if usage is None or identity is None:
            return
        usage.record(
            UsageEvent(
                self.clock.now(),
                identity.key_id,
                identity.owner,
                identity.service,
                request.method,
                request.route_id or request.path,
                status,
                time.perf_counter() - started,
                allow.cost if identity.charge is None else identity.charge.units_used(),
                None,
                identity.client_ip,
                self._request_id(request),
                identity.limits,
            )
        )

    def _refused(self, request: RequestInfo, denial: Denial, started: float) -> None:
        """Record the refusal of a key that proved its secret (see ``finished``)."""
        if self.usage is None or denial.key_id is None:
            return
        client = self.proxies.client_ip(request)
        self.usage.record(
            UsageEvent(
                self.clock.now(),
                denial.key_id,
                denial.owner,
                denial.service,
                request.method,
                request.route_id or request.path,
                denial.status,
                time.perf_counter() - started,
                0,
                denial.code,
                None if client is None else ip_text(client.ip),
                self._request_id(request),
            )
        )

    def _request_id(self, request: RequestInfo) -> str:
        """The client's ``X-Request-ID`` when it is a short safe token, else our own."""
        for name, value in request.headers:
            if name == b"x-request-id":
                text = safe_request_id(value)
                if text is not None:
                    return text
        return f"kg-{self._lease_prefix}-{next(self._request_ids):x}"
