"""One synchronous client interface over the five flavours.

ASGI flavours go through ``httpx.ASGITransport`` (on a private event loop, so tests
stay plain functions); WSGI flavours through :class:`WSGIServer`, which passes
headers on the way gunicorn and werkzeug's server do. Both report a handler's
exception as a 500, as a server would, and both give the client address
:data:`CLIENT_IP`.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol
from urllib.parse import unquote_to_bytes

import httpx

from keyguard.plans import Plan
from tests.adapters.flavours import ASGI_FLAVOURS, BUILDERS
from tests.adapters.world import PLAN, World

CLIENT_IP = "203.0.113.7"
BASE_URL = "http://testserver"
Headers = Mapping[str, str] | Sequence[tuple[bytes, bytes]]
WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class WSGIServer(httpx.BaseTransport):
    """Like ``httpx.WSGITransport``, but closer to a real server.

    Header bytes are decoded as latin-1 (PEP 3333), so non-ASCII values reach the app
    instead of failing in the client; repeated headers are joined with ``,`` as
    gunicorn and werkzeug do; the body is read in full and ``close()`` is always
    called; an exception from the app becomes a 500.
    """

    def __init__(self, app: WSGIApp, remote_addr: str) -> None:
        self.app = app
        self.remote_addr = remote_addr

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        started: list[tuple[str, list[tuple[str, str]]]] = []

        def start_response(status: str, headers: list[tuple[str, str]], exc: object = None) -> Any:
            started.append((status, headers))
            return lambda _: None

        try:
            result = self.app(self._environ(request), start_response)
            try:
                body = b"".join(result)
            finally:
                close = getattr(result, "close", None)
                if close is not None:
                    close()
        except Exception:  # what a server does with an app that raises
            return httpx.Response(500, content=b"Internal Server Error")
        status, headers = started[-1]
        raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
        return httpx.Response(int(status.split()[0]), headers=raw, content=body)

    def _environ(self, request: httpx.Request) -> dict[str, Any]:
        path, _, query = request.url.raw_path.partition(b"?")
        environ: dict[str, Any] = {
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "http",
            "wsgi.input": io.BytesIO(request.read()),
            "wsgi.errors": io.StringIO(),
            "wsgi.multithread": True,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
            "REQUEST_METHOD": request.method,
            "SCRIPT_NAME": "",
            "PATH_INFO": unquote_to_bytes(path).decode("latin-1"),
            "QUERY_STRING": query.decode("latin-1"),
            "SERVER_NAME": "testserver",
            "SERVER_PORT": "80",
            "SERVER_PROTOCOL": "HTTP/1.1",
            "REMOTE_ADDR": self.remote_addr,
        }
        for name, value in request.headers.raw:
            key = name.decode("latin-1").upper().replace("-", "_")
            if key not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
                key = "HTTP_" + key
            text = value.decode("latin-1")
            environ[key] = f"{environ[key]},{text}" if key in environ else text
        return environ


class Harness:
    """One flavour of the app, its world, and a client for it.

    :param flavour: one of :data:`~tests.adapters.flavours.FLAVOURS`.
    """

    def __init__(self, flavour: str, world: World) -> None:
        self.flavour = flavour
        self.world = world
        self.app = BUILDERS[flavour](world)
        self._runner: asyncio.Runner | None = None
        self._asgi: httpx.ASGITransport | None = None
        self._wsgi: WSGIServer | None = None
        if flavour in ASGI_FLAVOURS:
            client = (CLIENT_IP, 1234)
            self._asgi = httpx.ASGITransport(self.app, raise_app_exceptions=False, client=client)
            self._runner = asyncio.Runner()
        else:
            self._wsgi = WSGIServer(self.app, CLIENT_IP)

    def request(self, method: str, path: str, headers: Headers = ()) -> httpx.Response:
        """Send one request, with exactly ``headers`` (and Host), and return the response.

        It goes straight to the transport: an httpx client would merge in its default
        headers and parse cookies, and both choke on the non-ASCII header names the
        fuzz test sends.
        """
        sent = httpx.Request(method, BASE_URL + path, headers=headers)
        if self._wsgi is not None:
            response = self._wsgi.handle_request(sent)
            response.read()
            return response
        assert self._runner is not None
        assert self._asgi is not None
        return self._runner.run(self._async_request(self._asgi, sent))

    @staticmethod
    async def _async_request(transport: httpx.ASGITransport, sent: httpx.Request) -> httpx.Response:
        response = await transport.handle_async_request(sent)
        await response.aread()
        return response

    def close(self) -> None:
        if self._runner is not None:
            self._runner.close()
        self.world.close()


class MakeHarness(Protocol):
    """Builds one flavour of the app on a fresh world; closed after the test."""

    def __call__(self, flavour: str, *, plan: Plan = PLAN, auth_failures: int = 20) -> Harness: ...
