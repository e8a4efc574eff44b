"""Key material, token forging, and real HTTP servers for the OAuth tests.

- :class:`Keys`: the issuer's RSA, EC and Ed25519 keys and an attacker's EC key.
- :func:`forge`: a compact JWS from any header and payload, signed with any key and
  any algorithm (HS256 with raw bytes too, which PyJWT itself refuses to do with a
  public key: exactly what an attacker does by hand).
- :class:`StubServer`: a real HTTP server on 127.0.0.1 in a thread whose answers
  (good JWKS, 5xx, slow, junk, empty, 10 MB, introspection) and request log the test
  controls; the same class is the attacker's server, which must never be called.
- :class:`UvicornThread`: a real uvicorn server for an ASGI app, on a free port.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import uvicorn
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm, get_default_algorithms
from jwt.utils import base64url_encode

ISS = "https://idp.example.com"
AUD = "https://api.example.com"
NOW = 1_800_000_000


def b64(data: bytes) -> str:
    return base64url_encode(data).decode()


@dataclass(frozen=True)
class Keys:
    """The issuer's keys (one per type) and an attacker's."""

    rsa: rsa.RSAPrivateKey
    ec: EllipticCurvePrivateKey
    ed: ed25519.Ed25519PrivateKey
    attacker: EllipticCurvePrivateKey

    @classmethod
    def make(cls) -> Keys:
        return cls(
            rsa.generate_private_key(public_exponent=65537, key_size=2048),
            ec.generate_private_key(ec.SECP256R1()),
            ed25519.Ed25519PrivateKey.generate(),
            ec.generate_private_key(ec.SECP256R1()),
        )

    def jwks(self, *, without: tuple[str, ...] = ()) -> dict[str, Any]:
        """The issuer's JWKS: rsa-1 (alg RS256), ec-1 (no alg), ed-1, and enc-1 (use enc)."""
        rsa_jwk = {**RSAAlgorithm.to_jwk(self.rsa.public_key(), as_dict=True), "kid": "rsa-1"}
        keys = [
            {**rsa_jwk, "alg": "RS256", "use": "sig"},
            {**ECAlgorithm.to_jwk(self.ec.public_key(), as_dict=True), "kid": "ec-1"},
            {**OKPAlgorithm.to_jwk(self.ed.public_key(), as_dict=True), "kid": "ed-1"},
            {**rsa_jwk, "kid": "enc-1", "use": "enc"},
        ]
        return {"keys": [k for k in keys if k["kid"] not in without]}

    def attacker_jwk(self) -> dict[str, Any]:
        return {**ECAlgorithm.to_jwk(self.attacker.public_key(), as_dict=True), "kid": "att-1"}


def claims(**changes: Any) -> dict[str, Any]:
    """A valid RFC 9068 payload at :data:`NOW`; ``None`` values remove a claim."""
    base: dict[str, Any] = {
        "iss": ISS,
        "aud": AUD,
        "sub": "client-1",
        "client_id": "client-1",
        "iat": NOW,
        "exp": NOW + 300,
        "jti": "jti-1",
        "scope": "read",
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def header(**changes: Any) -> dict[str, Any]:
    """An ES256 ``at+jwt`` header for ``ec-1``; ``None`` values remove a member."""
    base: dict[str, Any] = {"alg": "ES256", "typ": "at+jwt", "kid": "ec-1"}
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def forge(
    head: dict[str, Any] | str,
    payload: dict[str, Any] | str | bytes,
    key: object,
    alg: str | None = None,
) -> str:
    """A compact JWS; ``head``/``payload`` as dicts or raw JSON text, signed by ``key``
    with ``alg`` (default: the header's). HMAC keys are raw bytes, unchecked."""
    head_text = head if isinstance(head, str) else json.dumps(head)
    if isinstance(payload, bytes):
        body = payload
    else:
        body = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
    signing_input = f"{b64(head_text.encode())}.{b64(body)}"
    name = alg or (json.loads(head_text)["alg"] if isinstance(head, str) else head["alg"])
    signature = get_default_algorithms()[name].sign(signing_input.encode(), key)
    return f"{signing_input}.{b64(signature)}"


def token(keys: Keys, **changes: Any) -> str:
    """A valid ES256 token by ``ec-1`` with claim ``changes``."""
    return forge(header(), claims(**changes), keys.ec)


# -- a controllable HTTP server -----------------------------------------------------------


@dataclass
class Behaviour:
    """What the stub answers; tests change it between requests."""

    mode: str = "ok"  # ok | 500 | slow | junk | empty | huge | introspect
    document: Any = None
    delay: float = 1.0
    log: list[tuple[str, str, bytes, dict[str, str]]] = field(default_factory=list)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        self._answer(b"")

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        self._answer(self.rfile.read(length))

    def _answer(self, body: bytes) -> None:
        state = self.server.behaviour
        state.log.append((self.command, self.path, body, dict(self.headers.items())))
        # The client gives up on "huge" and "slow", as it should.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self._respond(state)

    def _respond(self, state: Behaviour) -> None:
        if state.mode == "500":
            self._send(500, b'{"error": "down"}')
        elif state.mode == "slow":
            time.sleep(state.delay)
            self._send(200, json.dumps(state.document).encode())
        elif state.mode == "junk":
            self._send(200, b"<html>not json{{{")
        elif state.mode == "empty":
            self._send(200, b'{"keys": []}')
        elif state.mode == "huge":
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.end_headers()  # no length: the body runs until the socket closes
            chunk = b"[" * 65536
            for _ in range(160):  # 10 MiB
                self.wfile.write(chunk)
        else:
            self._send(200, json.dumps(state.document).encode())

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the request log is in ``behaviour.log``."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    behaviour: Behaviour

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hangs up mid-answer is expected here, not an error."""


class StubServer:
    """A real HTTP server on 127.0.0.1 in a thread (loopback only)."""

    def __init__(self) -> None:
        self.behaviour = Behaviour()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.behaviour = self.behaviour
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def reset(self, document: Any = None, mode: str = "ok") -> None:
        self.behaviour.mode = mode
        self.behaviour.document = document
        self.behaviour.log.clear()

    @property
    def hits(self) -> int:
        return len(self.behaviour.log)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


# -- a real uvicorn server ------------------------------------------------------------------


class UvicornThread:
    """An ASGI app served by uvicorn on 127.0.0.1: the port is known before the app is
    built (so an app can name its own URL), and the server starts with :meth:`serve`."""

    def __init__(self) -> None:
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind(("127.0.0.1", 0))
        self.port: int = self._socket.getsockname()[1]
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def serve(self, app: Any) -> UvicornThread:
        config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False)
        server = self._server = uvicorn.Server(config)
        thread = self._thread = threading.Thread(
            target=lambda: asyncio.run(server.serve(sockets=[self._socket])), daemon=True
        )
        thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def close(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(10)
        self._socket.close()


@contextmanager
def serving(make: Callable[[], StubServer] = StubServer) -> Iterator[StubServer]:
    server = make()
    try:
        yield server
    finally:
        server.close()
