"""One webhook POST over the standard library's ``http.client``.

No new dependency, no redirects followed, and the socket goes to the very address
that passed the SSRF check (see :mod:`.urls`). A transport is any callable of this
shape, so tests and deployments with their own HTTP stack can swap it.
"""

from __future__ import annotations

import http.client
import socket
import ssl
from collections.abc import Callable, Mapping
from typing import NamedTuple

from .config import Webhook
from .urls import Target, check_webhook_url, resolve

__all__ = ["Response", "Transport", "http_post"]

_READ_AT_MOST = 4096  # a receiver's answer is read (to reuse nothing) but never kept


class Response(NamedTuple):
    """What a receiver answered: its status and ``Retry-After`` seconds, if any."""

    status: int
    retry_after: float | None = None


Transport = Callable[[Webhook, bytes, Mapping[str, str], float], Response]


class _Pinned(http.client.HTTPConnection):
    """An HTTP(S) connection to a pre-resolved address, still naming the host (Host
    header, TLS SNI and certificate check)."""

    def __init__(self, target: Target, address: str, timeout: float) -> None:
        super().__init__(target.host, target.port, timeout=timeout)
        self._address = address
        self._tls = ssl.create_default_context() if target.scheme == "https" else None
        if self._tls is not None:
            self.default_port = 443  # keeps ``Host`` free of ``:443``

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        if self._tls is None:
            self.sock = sock
        else:
            self.sock = self._tls.wrap_socket(sock, server_hostname=self.host)


def _retry_after(value: str | None) -> float | None:
    if value is None or not value.strip().isdigit():
        return None  # HTTP-date forms are ignored: backoff applies instead
    return float(value.strip())


def http_post(hook: Webhook, body: bytes, headers: Mapping[str, str], timeout: float) -> Response:
    """POST ``body`` to ``hook.url``; ``timeout`` bounds each socket operation.

    Raises :class:`OSError` or :class:`http.client.HTTPException` when no answer came
    (retried), :class:`~keyguard.alerts.urls.BlockedAddress` for a refused address.
    The name lookup itself is not bounded by ``timeout`` (``getaddrinfo`` cannot be).
    """
    target = check_webhook_url(hook.url, allow_private=hook.allow_private)
    address = resolve(target.host, target.port, allow_private=hook.allow_private)
    connection = _Pinned(target, address, timeout)
    try:
        connection.request("POST", target.path, body=body, headers=dict(headers))
        answer = connection.getresponse()
        answer.read(_READ_AT_MOST)
        return Response(answer.status, _retry_after(answer.getheader("Retry-After")))
    finally:
        connection.close()
