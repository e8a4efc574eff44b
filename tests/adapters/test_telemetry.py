"""keyguard's span through the ASGI and WSGI middleware: parentage, every denial, and T62.

A tiny server-span wrapper stands in for OpenTelemetry's ASGI/WSGI instrumentation
(not installed): it opens a SERVER span around the app, as the instrumentation does,
so keyguard's ``keyguard.check`` must appear as its child. Providers are explicit;
the global ones are never set.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, Tracer

from keyguard.adapters.asgi import ASGIApp, KeyGuardMiddleware, Receive, Scope, Send
from keyguard.adapters.wsgi import KeyGuardWSGIMiddleware
from keyguard.backends.memory_usage import MemoryUsageStore
from keyguard.credentials import CredentialConfig
from keyguard.denials import TABLE
from keyguard.errors import StorageError
from keyguard.guard import Guard
from keyguard.scopes import RouteMap, RouteRule
from keyguard.telemetry import SPAN_NAME, Telemetry
from keyguard.usage.recorder import UsageRecorder
from keyguard.usage.records import Granularity, RowQuery
from tests.adapters.security_support import (
    BACKENDS,
    FACES,
    Env,
    Reply,
    WSGIApp,
    asgi_call,
    canary,
    http_scope,
    sweep,
    well_formed,
    wsgi_call,
    wsgi_environ,
)

WITH_QUERY = CredentialConfig(methods=("header", "bearer", "query"))
ORDERS = RouteMap([RouteRule("GET", "/orders", "orders:read")])
# Everything keyguard may put on its span; nothing URL-, header- or query-shaped.
ALLOWED_ATTRIBUTES = {
    "keyguard.decision",
    "keyguard.denial.reason",
    "keyguard.key.id",
    "keyguard.auth.method",
    "keyguard.service",
    "keyguard.ratelimit.remaining",
    "keyguard.client.address",
    "keyguard.storage.error",
    "error.type",
}


class Traced:
    """In-memory sinks, the telemetry writing to them, and a server-span tracer."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        self.meters = MeterProvider(metric_readers=[self.reader])
        self.telemetry = Telemetry(tracer_provider=self.provider, meter_provider=self.meters)
        self.server: Tracer = self.provider.get_tracer("server-instrumentation")

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def checks(self) -> list[ReadableSpan]:
        return [s for s in self.spans() if s.name == SPAN_NAME]

    def dump(self) -> str:
        """Every span (name, attributes, events, status, links) and every metric point."""
        data = self.reader.get_metrics_data()
        metrics = "" if data is None else data.to_json()
        return "\n".join([*(s.to_json() for s in self.spans()), metrics])

    def close(self) -> None:
        self.provider.shutdown()
        self.meters.shutdown()


class TracedEnv(Env):
    """The security environment, every guard of it reporting to ``traced``."""

    def __init__(self, backend: str, tmp: Path, traced: Traced) -> None:
        super().__init__(backend, tmp)
        self.traced = traced

    def guard(self, **options: Any) -> Guard:
        options.setdefault("telemetry", self.traced.telemetry)
        return super().guard(**options)


@pytest.fixture
def traced() -> Iterator[Traced]:
    sinks = Traced()
    yield sinks
    sinks.close()


@pytest.fixture(params=BACKENDS)
def tenv(request: pytest.FixtureRequest, tmp_path: Path, traced: Traced) -> Iterator[TracedEnv]:
    environment = TracedEnv(request.param, tmp_path, traced)
    yield environment
    environment.close()


def server_asgi(tracer: Tracer, app: ASGIApp) -> ASGIApp:
    """A SERVER span around the app, as opentelemetry-instrumentation-asgi opens one."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        with tracer.start_as_current_span("GET", kind=SpanKind.SERVER):
            await app(scope, receive, send)

    return wrapped


def server_wsgi(tracer: Tracer, app: WSGIApp) -> WSGIApp:
    """The same for WSGI (the body is read inside the span, as the test driver does)."""

    def wrapped(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        with tracer.start_as_current_span("GET", kind=SpanKind.SERVER):
            return list(app(environ, start_response))

    return wrapped


def send(
    env: TracedEnv,
    face: str,
    guard: Guard,
    *,
    path: str = "/",
    headers: Iterable[tuple[str, str]] = (),
    query: str = "",
) -> Reply:
    """One request through the middleware of ``face``, under a server span."""
    raw = [(k.encode(), v.encode()) for k, v in headers]
    tracer = env.traced.server
    try:
        if face == "asgi":
            app = server_asgi(tracer, KeyGuardMiddleware(env.app.asgi, guard=guard))
            return env.run(asgi_call(app, http_scope("GET", path, raw, query.encode())))
        wsgi = server_wsgi(tracer, KeyGuardWSGIMiddleware(env.app.wsgi, guard=guard))
        return wsgi_call(wsgi, wsgi_environ("GET", path, raw, query.encode()))
    except RuntimeError:  # the handler failed: the server answers 500
        return Reply(500, (), b"")


@pytest.mark.parametrize("face", FACES)
def test_check_span_is_a_child_of_the_server_span(
    tenv: TracedEnv, traced: Traced, face: str
) -> None:
    key = tenv.issue()
    reply = send(tenv, face, tenv.guard(), headers=[("x-api-key", key.key)])
    assert reply.status == 200
    server, check = sorted(traced.spans(), key=lambda s: s.kind is SpanKind.INTERNAL)
    assert server.kind is SpanKind.SERVER
    assert check.name == SPAN_NAME
    assert check.parent is not None
    assert server.context is not None
    assert check.parent.span_id == server.context.span_id
    assert dict(check.attributes or {})["keyguard.key.id"] == key.record.id


@pytest.mark.parametrize("face", FACES)
def test_every_denial_of_the_sweep_is_on_a_span(tenv: TracedEnv, traced: Traced, face: str) -> None:
    replies = sweep(tenv, face)
    codes = {r.error()["code"] for _, r in replies if r.status != 200}
    spans = traced.checks()
    reasons = {dict(s.attributes or {}).get("keyguard.denial.reason") for s in spans}
    assert codes <= reasons
    assert codes >= set(TABLE) - {"invalid_token", "token_validation_unavailable"}
    for span in spans:
        attributes = dict(span.attributes or {})
        assert set(attributes) <= ALLOWED_ATTRIBUTES
        if attributes.get("keyguard.denial.reason") in {
            "insufficient_permissions",
            "rate_limit_exceeded",
            "quota_exceeded",
            "concurrency_limit_exceeded",
            "limiter_unavailable",
        }:
            assert str(attributes["keyguard.key.id"]).startswith("key_")
            assert attributes["keyguard.auth.method"] == "header"
    requests = traced.dump()
    assert "keyguard.requests" in requests
    assert "keyguard.storage.errors" in requests


def provoke(env: TracedEnv, face: str, guard: Guard, path: str, method: str) -> list[str]:
    """Send secrets by ``method`` down one path; return the secrets that must not leak."""

    def carry(key: str) -> dict[str, Any]:
        if method == "header":
            return {"headers": [("x-api-key", key)]}
        if method == "bearer":
            return {"headers": [("authorization", f"Bearer {key}")]}
        return {"query": f"api_key={key}"}

    if path == "unknown":
        secret = canary()
        reply = send(env, face, guard, **carry(well_formed(secret)))
        assert reply.status == 401
        return [secret]
    issued = env.issue(scopes=["orders:read"], rate="1/minute")
    expected = 200
    route = "/orders"
    if path == "denied":
        send(env, face, guard, path=route, **carry(issued.key))
        expected = 429
    elif path == "handler 500":
        env.app.failure = RuntimeError("the handler failed")
        expected = 500
    elif path == "internal 500":
        env.keys.failure = RuntimeError(f"a message quoting {issued.key}")
        expected = 500
    elif path == "store 503":
        env.keys.failure = StorageError(f"down while reading {issued.key}")
        expected = 503
    reply = send(env, face, guard, path=route, **carry(issued.key))
    env.app.failure = env.keys.failure = None
    assert reply.status == expected
    return [issued.secret, issued.key]


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("method", ["header", "bearer", "query"])
@pytest.mark.parametrize(
    "path", ["allowed", "denied", "unknown", "handler 500", "internal 500", "store 503"]
)
def test_t62_no_secret_in_spans_or_metrics(
    *,
    tenv: TracedEnv,
    traced: Traced,
    face: str,
    method: str,
    path: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """SECURITY.md T62: the credential reaches no span part, no metric attribute, no
    log line, no usage row and no error-log entry; nor does an ``api_key=`` value."""
    caplog.set_level(logging.DEBUG)
    usage = MemoryUsageStore()
    recorder = UsageRecorder(usage, clock=tenv.clock)
    guard = tenv.guard(routes=ORDERS, credentials=WITH_QUERY, usage=recorder)
    secrets = provoke(tenv, face, guard, path, method)
    recorder.close()
    checks = traced.checks()
    assert checks, "keyguard recorded no span"
    rows = usage.rows(RowQuery(Granularity.MINUTE, 0, 2**40))
    logged = [usage.errors(row.key_id) for row in rows]
    sinks = traced.dump() + caplog.text + repr(rows) + repr(logged)
    for secret in secrets:
        assert secret not in sinks
    assert "api_key=" not in sinks
    for span in checks:
        attributes = dict(span.attributes or {})
        assert set(attributes) <= ALLOWED_ATTRIBUTES
        assert not {"url.query", "url.full", "http.target"} & set(attributes)
        assert not any(name.startswith("http.request.header.") for name in attributes)
        assert span.events == ()
        assert span.links == ()
        if path not in {"unknown", "store 503", "internal 500"}:
            assert attributes["keyguard.auth.method"] == method
