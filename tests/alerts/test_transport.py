"""The stdlib transport and the SSRF checks of webhook addresses."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from keyguard.alerts import Webhook, http_post
from keyguard.alerts.transport import _retry_after
from keyguard.alerts.urls import BlockedAddress, check_webhook_url, is_public, resolve

from .conftest import SECRET


def fake_dns(monkeypatch: pytest.MonkeyPatch, table: dict[str, list[str]]) -> None:
    real = socket.getaddrinfo

    def lookup(host: str, port: int, *args: Any, **kwargs: Any) -> Any:
        if host in table:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in table[host]]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", lookup)


def test_resolve_checks_every_address(monkeypatch: pytest.MonkeyPatch) -> None:
    """A public name resolves to its first address; one private address among public
    ones blocks; no address at all is a retryable OSError."""
    fake_dns(
        monkeypatch,
        {
            "public.test": ["93.184.216.34", "93.184.216.35"],
            "mixed.test": ["93.184.216.34", "169.254.169.254"],
            "empty.test": [],
        },
    )
    assert resolve("public.test", 443, allow_private=False) == "93.184.216.34"
    with pytest.raises(BlockedAddress):
        resolve("mixed.test", 443, allow_private=False)
    assert resolve("mixed.test", 443, allow_private=True) == "93.184.216.34"
    with pytest.raises(OSError, match="no address"):
        resolve("empty.test", 443, allow_private=False)


def test_target_parsing() -> None:
    """A URL splits into scheme, host, default port and path with its query."""
    target = check_webhook_url("https://hooks.example.com/a/b?team=1")
    assert tuple(target) == ("https", "hooks.example.com", 443, "/a/b?team=1")
    assert check_webhook_url("http://hooks.example.com").path == "/"
    assert not is_public(ipaddress.ip_address("::ffff:10.0.0.1"))


def test_retry_after_parsing() -> None:
    """Only delay-seconds are honoured; HTTP dates and garbage are ignored."""
    assert _retry_after("120") == 120.0
    assert _retry_after(" 3 ") == 3.0
    assert _retry_after("Wed, 21 Oct 2015 07:28:00 GMT") is None
    assert _retry_after(None) is None


@pytest.fixture
def not_tls() -> Iterator[int]:
    """A TCP listener that accepts and hangs up: no TLS handshake possible."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(2.0)

    def serve() -> None:
        try:
            conn, _ = server.accept()
            conn.close()
        except OSError:
            pass

    thread = threading.Thread(target=serve)
    thread.start()
    yield int(server.getsockname()[1])
    thread.join(3.0)
    server.close()


def test_https_is_tls_to_the_pinned_address(not_tls: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """An https webhook connects to the checked address and starts TLS there; a peer
    that cannot speak TLS is a (retryable) OSError, never a plain-text POST."""
    fake_dns(monkeypatch, {"hooks.example.test": ["127.0.0.1"]})
    hook = Webhook(f"https://hooks.example.test:{not_tls}/hook", SECRET, allow_private=True)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        http_post(hook, b"{}", {"Content-Type": "application/json"}, 2.0)
