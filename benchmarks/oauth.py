"""OAuth: what validating a JWT access token costs per request, with its key cached.

``python -m benchmarks.oauth [--quick]`` prints microseconds per operation for:

- **ES256 token, cached key** (the headline): ``JWTValidator.validate`` on ES256
  tokens whose key came from a real JWKS fetch (``RemoteJWKS`` against a stdlib HTTP
  server on 127.0.0.1, loaded once before timing, so no request fetches): size and
  shape checks, header parse, key lookup by ``kid``, PyJWT signature verification,
  claim checks. 64 distinct tokens round-robin, so nothing is reused between calls;
- the same with ``StaticKeys`` (no refresh bookkeeping), and RS256 and EdDSA tokens;
- the floor: ``cryptography``'s ECDSA P-256 verification of the same signatures alone;
- ``Guard.check`` for a request with an ES256 token against one with an API key (memory
  stores, a plan without limits, so both measure authentication only).

Every loop checks its result (a refused token aborts the run). Figures are the median
of the repeats (see ``benchmarks/_harness.py``); quote them from a full run.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import cycle
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from jwt.api_jws import PyJWS
from jwt.utils import base64url_decode

from keyguard.backends.memory import MemoryKeyStore
from keyguard.guard import Allow, Guard
from keyguard.manager import KeyManager
from keyguard.oauth.jwks import RemoteJWKS
from keyguard.oauth.keyset import StaticKeys
from keyguard.oauth.validator import JWTValidator
from keyguard.plans import Plan
from keyguard.request import RequestInfo

from ._harness import Settings, SuiteReport, measure, measure_many, run_standalone

__all__ = ["main", "run"]

SUITE = "oauth"
ISSUER = "https://idp.example.com"
AUDIENCE = "https://api.example.com"
DISTINCT = 64
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


def _tokens(alg: str, key: PrivateKey, kid: str, count: int = DISTINCT) -> list[str]:
    now = int(time.time())
    signer = PyJWS(algorithms=[alg])
    tokens = []
    for i in range(count):
        claims = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": f"client-{i}",
            "client_id": f"client-{i}",
            "iat": now,
            "exp": now + 7200,
            "jti": f"jti-{i}",
            "scope": "text:generate image:create",
        }
        payload = json.dumps(claims, separators=(",", ":")).encode()
        headers = {"typ": "at+jwt", "kid": kid}
        tokens.append(signer.encode(payload, key, algorithm=alg, headers=headers))
    return tokens


class _Keys:
    def __init__(self) -> None:
        self.ec = ec.generate_private_key(ec.SECP256R1())
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ed = ed25519.Ed25519PrivateKey.generate()

    def jwks(self) -> dict[str, Any]:
        return {
            "keys": [
                {**ECAlgorithm.to_jwk(self.ec.public_key(), as_dict=True), "kid": "ec"},
                {**RSAAlgorithm.to_jwk(self.rsa.public_key(), as_dict=True), "kid": "rsa"},
                {**OKPAlgorithm.to_jwk(self.ed.public_key(), as_dict=True), "kid": "ed"},
            ]
        }


@contextmanager
def _jwks_server(document: dict[str, Any]) -> Iterator[str]:
    body = json.dumps(document).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/jwks"
    finally:
        server.shutdown()
        server.server_close()


def _validating(validator: JWTValidator, tokens: list[str]) -> Callable[[int], object]:
    pool = cycle(tokens)

    def loop(n: int) -> None:
        for _ in range(n):
            if not validator.validate(next(pool)).scopes:
                raise RuntimeError("a benchmark token was refused")

    return loop


def _ecdsa_floor(keys: _Keys, tokens: list[str]) -> Callable[[int], object]:
    """Only the P-256 verification, on the same signing inputs and signatures."""
    public = keys.ec.public_key()
    parts = []
    for token in tokens:
        signing_input, _, signature = token.rpartition(".")
        raw = base64url_decode(signature)
        der = encode_dss_signature(int.from_bytes(raw[:32]), int.from_bytes(raw[32:]))
        parts.append((signing_input.encode(), der))
    pool = cycle(parts)
    algorithm = ec.ECDSA(hashes.SHA256())

    def loop(n: int) -> None:
        for _ in range(n):
            message, der = next(pool)
            public.verify(der, message, algorithm)

    return loop


def _guard_loops(validator: JWTValidator, tokens: list[str]) -> dict[str, Callable[[int], object]]:
    store = MemoryKeyStore()
    guard = Guard(keys=store, plans={"free": Plan("free")}, tokens=validator, auth_failures=0)
    key = KeyManager(store).create("bench", scopes=["text:generate"]).key.reveal()

    def requests(values: list[str]) -> Iterator[RequestInfo]:
        built = [
            RequestInfo("GET", "/", ((b"authorization", f"Bearer {v}".encode()),), peer="10.0.0.1")
            for v in values
        ]
        return cycle(built)

    def checking(pool: Iterator[RequestInfo]) -> Callable[[int], object]:
        def loop(n: int) -> None:
            for _ in range(n):
                if not isinstance(guard.check(next(pool), scope="text:generate"), Allow):
                    raise RuntimeError("a benchmark request was refused")

        return loop

    return {
        "Guard.check, bearer ES256 token": checking(requests(tokens)),
        "Guard.check, bearer API key (information)": checking(requests([key])),
    }


def run(settings: Settings) -> SuiteReport:
    """Measure the suite; see the module docstring."""
    report = SuiteReport(SUITE)
    keys = _Keys()
    es256 = _tokens("ES256", keys.ec, "ec")
    with _jwks_server(keys.jwks()) as url:
        remote = RemoteJWKS(url)
        if remote.refresh() is None:
            raise RuntimeError("the local JWKS did not load")
    cached = JWTValidator(keys=remote, issuer=ISSUER, audience=AUDIENCE)
    static = JWTValidator(keys=StaticKeys.from_jwks(keys.jwks()), issuer=ISSUER, audience=AUDIENCE)
    headline = measure(_validating(cached, es256), settings)
    report.add("ES256 token, cached JWKS key (RemoteJWKS)", headline)
    timings = measure_many(
        {
            "ES256 token, StaticKeys": _validating(static, es256),
            "RS256 token, StaticKeys": _validating(static, _tokens("RS256", keys.rsa, "rsa")),
            "EdDSA token, StaticKeys": _validating(static, _tokens("EdDSA", keys.ed, "ed")),
            "floor: ECDSA P-256 verify alone": _ecdsa_floor(keys, es256),
            **_guard_loops(cached, es256),
        },
        settings,
    )
    for name, timing in timings.items():
        report.add(name, timing)
    floor = timings["floor: ECDSA P-256 verify alone"].median
    report.derive("ES256 validation above the bare signature check", headline.median - floor, "µs")
    report.derive("share of ES256 validation spent verifying", floor / headline.median, "x")
    return report


def main() -> None:
    run_standalone(run, __doc__)


if __name__ == "__main__":
    main()
