"""OpenTelemetry for keyguard's check: one span and three instruments, API only.

keyguard depends on ``opentelemetry-api`` alone. With no SDK configured the API
hands out proxy tracers and meters that drop everything; keyguard sees that they
would (one look per check at what the proxies themselves look at) and then skips the
span, the clock and the metrics, so a check costs about a microsecond more
(``python -m benchmarks.telemetry``). Providers set later
(``trace.set_tracer_provider``) are picked up from the next check on.

What is recorded is chosen so that no credential can reach a span or a metric: the
key's ID (never its secret or digest), the credential's *method*, the decision, the
denial code, the tightest window's remaining and the client address keyguard
resolved. keyguard never records the query string, the URL, a header or an
exception's message (which may quote request data, see ``Guard``), and records no
exception event. See ``docs/telemetry.md``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from functools import lru_cache
from importlib import metadata
from typing import TYPE_CHECKING

from opentelemetry import context, metrics, trace
from opentelemetry.trace import Span, Status, StatusCode

from .denials import Denial

if TYPE_CHECKING:
    from .guard import Decision
    from .iprules import IPAddress
    from .limiting import LimitState

__all__ = ["SPAN_NAME", "CheckObservation", "Telemetry", "default_telemetry"]

SPAN_NAME = "keyguard.check"
# Denials that mean a store failed: the flow produces them only on a StorageError.
_FAULTS = {"key_store_unavailable": "keys", "limiter_unavailable": "limits"}
# Seconds: a check takes tens of microseconds in process, milliseconds over a network,
# so the SDK's default boundaries (0, 5, 10, ... meant for milliseconds) would put
# every check in the first bucket.
_BUCKETS = (
    *(0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025),
    *(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
_MAX_LABEL_SETS = 4096  # decisions x reasons x services: few; a cap keeps it bounded


def _version() -> str:
    try:
        return metadata.version("keyguard")
    except metadata.PackageNotFoundError:  # pragma: no cover - run from a bare checkout
        return "0"


class Telemetry:
    """keyguard's tracer and instruments, created once and shared by guards.

    :param tracer_provider: the provider of the ``keyguard.check`` spans; by default
        the global one (``trace.set_tracer_provider``), even if it is set later.
    :param meter_provider: the provider of the metrics; by default the global one.
    :param client_address: put the client address keyguard resolved on the span
        (``keyguard.client.address``). It is personal data in some jurisdictions;
        turn it off if your traces must not hold it. Metrics never carry it.
    """

    def __init__(
        self,
        *,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
        client_address: bool = True,
    ) -> None:
        version = _version()
        self.tracer = trace.get_tracer("keyguard", version, tracer_provider)
        meter = metrics.get_meter("keyguard", version, meter_provider)
        self.requests = meter.create_counter(
            "keyguard.requests", "{request}", "Requests keyguard decided on."
        )
        self.duration = meter.create_histogram(
            "keyguard.check.duration",
            "s",
            "Time keyguard took to decide on a request.",
            explicit_bucket_boundaries_advisory=_BUCKETS,
        )
        self.storage_errors = meter.create_counter(
            "keyguard.storage.errors", "{error}", "Failed calls to the key or limit store."
        )
        self.client_address = client_address
        # Only the global providers can be "not set yet"; explicit ones always record.
        self._proxied = tracer_provider is None and meter_provider is None
        self._labels: dict[tuple[str | None, str | None], Mapping[str, str]] = {}

    def begin(self) -> CheckObservation | None:
        """Start observing one check: a child span of the current one, and a clock.

        ``None`` while no SDK provider is set: the API's proxies would drop the span
        and every measurement, so there is nothing worth a microsecond to record. The
        test reads the two things the proxies test (both private to the API, hence
        ``getattr`` with a default that means "an SDK may be there": record).
        """
        if (
            self._proxied
            and getattr(trace, "_TRACER_PROVIDER", self) is None
            and getattr(self.requests, "_real_instrument", self) is None
        ):
            return None
        # INTERNAL is start_span's default kind; naming it costs a keyword per request.
        span = self.tracer.start_span(SPAN_NAME)
        if not span.is_recording():
            return CheckObservation(self, None, None)
        token = context.attach(trace.set_span_in_context(span))
        return CheckObservation(self, span, token)

    def storage_error(self, store: str) -> None:
        """Count one failed call to the ``"keys"`` or the ``"limits"`` store."""
        self.storage_errors.add(1, {"keyguard.store": store})

    def labels(self, code: str | None, service: str | None) -> Mapping[str, str]:
        """The metric attributes of a decision, built once per combination."""
        key = (code, service)
        found = self._labels.get(key)
        if found is not None:
            return found
        labels = {
            "keyguard.decision": "allow" if code is None else "deny",
            "keyguard.reason": code or "none",
        }
        if service is not None:
            labels["keyguard.service"] = service
        if len(self._labels) < _MAX_LABEL_SETS:
            self._labels[key] = labels
        return labels


class CheckObservation:
    """One check in progress; the flow notes what a denial alone does not say.

    An allowed request's identity already holds the key, method, service and limits;
    a denial is only a code, so the flow fills in what it learnt before refusing.
    """

    __slots__ = (
        "_span",
        "_started",
        "_telemetry",
        "_token",
        "client",
        "fault",
        "key_id",
        "limits",
        "method",
        "service",
    )

    def __init__(self, telemetry: Telemetry, span: Span | None, token: object) -> None:
        self._telemetry = telemetry
        self._span = span
        self._token = token
        self.client: IPAddress | None = None
        self.service: str | None = None
        self.key_id: str | None = None
        self.method: str | None = None
        self.limits: tuple[LimitState, ...] = ()
        self.fault: str | None = None  # a store that failed while the request was allowed
        self._started = time.perf_counter()

    def finish(self, decision: Decision | None) -> None:
        """Record the decision; ``None`` when the check was cancelled or interrupted."""
        telemetry = self._telemetry
        if decision is not None:
            elapsed = time.perf_counter() - self._started
            if isinstance(decision, Denial):
                code: str | None = decision.code
                service = self.service
                fault = self.fault or _FAULTS.get(decision.code)
            else:
                code, fault = None, self.fault
                service = self.service if decision.identity is None else decision.identity.service
            labels = telemetry.labels(code, service)
            telemetry.requests.add(1, labels)
            telemetry.duration.record(elapsed, labels)
            if fault is not None:
                self.fault = fault
                telemetry.storage_error(fault)
        span = self._span
        if span is None:
            return
        try:
            if decision is not None:
                span.set_attributes(self._attributes(decision))
                if isinstance(decision, Denial) and decision.status >= 500:
                    span.set_status(Status(StatusCode.ERROR, decision.code))
        finally:
            context.detach(self._token)  # type: ignore[arg-type]
            span.end()

    def _attributes(self, decision: Decision) -> dict[str, str | int]:
        """The span's attributes: identifiers and outcome, never a credential."""
        attributes: dict[str, str | int] = {}
        client = None if self.client is None else str(self.client)
        if isinstance(decision, Denial):
            attributes["keyguard.decision"] = "deny"
            attributes["keyguard.denial.reason"] = decision.code
            if decision.status >= 500:
                attributes["error.type"] = decision.code
            key_id, method, service, limits = self.key_id, self.method, self.service, self.limits
        else:
            attributes["keyguard.decision"] = "allow"
            identity = decision.identity
            if identity is None:  # a public path or a preflight: nobody to name
                return attributes
            key_id, method, service = identity.key_id, identity.auth_method, identity.service
            limits, client = identity.limits, identity.client_ip
        if key_id is not None:
            attributes["keyguard.key.id"] = key_id
        if method is not None:
            attributes["keyguard.auth.method"] = method
        if service is not None:
            attributes["keyguard.service"] = service
        if limits:
            attributes["keyguard.ratelimit.remaining"] = min(s.remaining for s in limits)
        if self.fault is not None:
            attributes["keyguard.storage.error"] = self.fault
        if client is not None and self._telemetry.client_address:
            attributes["keyguard.client.address"] = client
        return attributes


@lru_cache(maxsize=1)
def default_telemetry() -> Telemetry:
    """The telemetry of every guard left at ``telemetry=True``: the global providers."""
    return Telemetry()
