"""WSGI middleware: the same guard, the same denials, for Flask or any WSGI app.

The identity is published as ``environ["keyguard.identity"]``. A concurrency slot is
released in the response iterable's ``close()``, which PEP 3333 obliges servers to
call whether the response completed, failed or the client went away; if a server
never calls it, the lease's expiry reclaims the slot.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from ..credentials import strip_credentials
from ..denials import Denial, render
from ..guard import Allow, Guard, Identity, Lease
from ..request import RequestInfo, request_info
from ._common import vary_headers

__all__ = [
    "ENVIRON_KEY",
    "KeyGuardWSGIMiddleware",
    "current_identity",
    "guarded_headers",
    "request_from_environ",
]

ENVIRON_KEY = "keyguard.identity"
Environ = dict[str, Any]
StartResponse = Callable[..., Any]
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]
_RESERVED = {"CONTENT_TYPE": b"content-type", "CONTENT_LENGTH": b"content-length"}


def _latin1(value: str) -> bytes:
    # PEP 3333 hands header values over as latin-1 decoded str; encoding them back
    # recovers the raw bytes the client sent.
    return value.encode("latin-1", "replace")


def _header_name(key: str) -> bytes:
    # A server may upper-case a non-ASCII byte into a character whose lower case is
    # outside latin-1 (b"\xb5" -> U+039C -> U+03BC); such a name is replaced, not a crash.
    return key[5:].lower().replace("_", "-").encode("latin-1", "replace")


def request_from_environ(
    environ: Environ, wanted: Mapping[str, bytes] | None = None
) -> RequestInfo:
    """The framework-free view of a WSGI environ.

    Header names come from ``HTTP_*`` keys; a server that maps ``X_API_Key`` onto
    ``HTTP_X_API_KEY`` makes the two indistinguishable here (see the docs on
    underscore headers). ``wanted`` (environ key → header name) limits the headers to
    those the guard reads, which spares re-encoding every other header per request.
    """
    headers: list[tuple[bytes, bytes]] = []
    if wanted is None:
        for key, value in environ.items():
            if key.startswith("HTTP_"):
                headers.append((_header_name(key), _latin1(value)))
            elif key in _RESERVED and value:
                headers.append((_RESERVED[key], _latin1(value)))
    else:
        for key, name in wanted.items():
            value = environ.get(key)
            if value is not None:
                headers.append((name, _latin1(value)))
    path = environ.get("PATH_INFO", "/") or "/"
    return request_info(
        method=environ.get("REQUEST_METHOD", "GET").upper(),
        path=path if path.isascii() else _latin1(path).decode("utf-8", "replace"),
        headers=tuple(headers),
        query_string=_latin1(environ.get("QUERY_STRING", "")),
        peer=environ.get("REMOTE_ADDR") or None,
        route_id=None,
    )


def guarded_headers(guard: Guard) -> dict[str, bytes]:
    """The environ keys of every header the guard reads, and their header names."""
    names = [
        guard.credentials.header_name,
        "authorization",
        "x-forwarded-for",
        "forwarded",
        "access-control-request-method",
        "x-request-id",  # the usage error log's request id
    ]
    return {"HTTP_" + n.upper().replace("-", "_"): n.encode("ascii") for n in names}


def current_identity(environ: Environ) -> Identity | None:
    identity = environ.get(ENVIRON_KEY)
    return identity if isinstance(identity, Identity) else None


def denial_response(
    denial: Denial, start_response: StartResponse, realm: str, extra: list[tuple[bytes, bytes]]
) -> list[bytes]:
    """Start a denial response and return its body."""
    status, headers, body = render(denial, realm=realm)
    start_response(
        f"{status} {_REASONS.get(status, 'Error')}",
        [(k.decode("latin-1"), v.decode("latin-1")) for k, v in [*headers, *extra]],
    )
    return [body]


_REASONS = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    429: "Too Many Requests",
    500: "Internal Server Error",  # the guard's internal_error denial
    503: "Service Unavailable",
}


class _Closing:
    """Wraps the app's iterable so ``close()`` releases the lease exactly once."""

    def __init__(self, inner: Iterable[bytes], release: Callable[[], None]) -> None:
        self._inner = inner
        self._release: Callable[[], None] | None = release

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._inner)

    def close(self) -> None:
        try:
            close = getattr(self._inner, "close", None)
            if close is not None:
                close()
        finally:
            release, self._release = self._release, None
            if release is not None:
                release()


class KeyGuardWSGIMiddleware:
    """Guard every request of a WSGI app (see :class:`~keyguard.guard.Guard`)."""

    def __init__(
        self, app: WSGIApp, *, guard: Guard, hide_credentials: bool = False, vary: bool = True
    ) -> None:
        self.app = app
        self.guard = guard
        self.hide_credentials = hide_credentials
        self._vary = vary_headers(guard, vary)
        self._wanted = guarded_headers(guard)

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        started = time.perf_counter()
        request = request_from_environ(environ, self._wanted)
        decision = self.guard.check(request, scope=environ.get("keyguard.scope"))
        if isinstance(decision, Denial):
            return denial_response(decision, start_response, self.guard.realm, self._vary)
        return self.call_app(environ, start_response, request, decision, started)

    def call_app(
        self,
        environ: Environ,
        start_response: StartResponse,
        request: RequestInfo,
        allow: Allow,
        started: float | None = None,
    ) -> Iterable[bytes]:
        """Run the app for an allowed request, with limit headers, slot release and
        usage recorded when the response is closed (``started``: the
        ``time.perf_counter()`` reading before the check; now when not given)."""
        environ[ENVIRON_KEY] = allow.identity
        identity = allow.identity
        if self.hide_credentials and identity is not None:
            _hide(environ, request, self.guard)
        extra = (
            [(k.decode("latin-1"), v.decode("latin-1")) for k, v in [*allow.headers, *self._vary]]
            if identity is not None
            else []
        )
        private = identity is not None and identity.auth_method == "query"
        end = _End(self.guard, allow, request, time.perf_counter() if started is None else started)

        def start(status: str, headers: list[tuple[str, str]], exc_info: object = None) -> object:
            end.status = _status_code(status)
            headers = [*headers, *extra]
            if private and not any(k.lower() == "cache-control" for k, _ in headers):
                headers.append(("Cache-Control", "private"))
            return start_response(status, headers, exc_info)

        if allow.lease is None and end.allow is None:
            # ``start`` also adds Cache-Control: private for a key from the URL, which
            # is needed even when there is no other header to add (RFC 6750 §2.3).
            return self.app(environ, start if extra or private else start_response)
        release = end.once
        try:
            body = self.app(environ, start)
        except BaseException:
            release()
            raise
        return _Closing(body, release)


class _End:
    """Ends one allowed request once: records its usage, releases its lease."""

    __slots__ = ("_guard", "_lease", "_request", "_started", "allow", "status")

    def __init__(self, guard: Guard, allow: Allow, request: RequestInfo, started: float) -> None:
        self._guard = guard
        recorded = guard.usage is not None and allow.identity is not None
        self.allow: Allow | None = allow if recorded else None
        self._lease: Lease | None = allow.lease
        self._request = request
        self._started = started
        self.status = 500  # what the server answers when the app fails before starting

    def once(self) -> None:
        allow, self.allow = self.allow, None
        lease, self._lease = self._lease, None
        try:
            if allow is not None:
                self._guard.finished(self._request, allow, self.status, self._started)
        finally:
            if lease is not None:
                self._guard.release(lease)


def _status_code(status: str) -> int:
    code = status[:3]
    return int(code) if code.isdigit() else 500


def _hide(environ: Environ, request: RequestInfo, guard: Guard) -> None:
    """Remove the credential from the environ the app sees; every other header stays."""
    headers, query = strip_credentials(request, guard.credentials)
    removed = {name for name, _ in request.headers} - {name for name, _ in headers}
    for key in [k for k in environ if k.startswith("HTTP_")]:
        if _header_name(key) in removed:
            del environ[key]
    text = query.decode("latin-1")
    environ["QUERY_STRING"] = text
    # Servers also hand the whole request target over (werkzeug REQUEST_URI, gunicorn
    # RAW_URI); rebuilt from the path and the stripped query, they cannot leak it.
    for key in ("REQUEST_URI", "RAW_URI"):
        target = environ.get(key)
        if isinstance(target, str):
            path = target.partition("?")[0]
            environ[key] = f"{path}?{text}" if text else path
