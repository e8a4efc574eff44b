"""Webhook URLs: which are accepted, and which addresses a delivery may reach.

A webhook URL is a server-side request the operator lets a key owner aim (SSRF).
Two checks guard it: at configuration, the URL must be plain http(s) with a host, no
user-info (credentials belong in the signature, not the URL) and, unless allowed, no
literal private address; at delivery, every address the host resolves to must be
public, and the connection goes to the address that was checked — never to a second
lookup an attacker's DNS could answer differently (rebinding). Redirects are not
followed (``http.client`` never does).
"""

from __future__ import annotations

import ipaddress
import socket
from typing import NamedTuple
from urllib.parse import urlsplit

from ..errors import ConfigurationError

__all__ = ["BlockedAddress", "Target", "check_webhook_url", "is_public", "resolve"]

MAX_URL = 2048
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class BlockedAddress(Exception):
    """The webhook host resolved to an address deliveries may not reach; not retried."""


class Target(NamedTuple):
    """A parsed webhook URL: what to connect to and what to ask for."""

    scheme: str
    host: str
    port: int
    path: str


def is_public(address: IPAddress) -> bool:
    """Whether an address is globally routable (not loopback, private, link-local —
    the cloud metadata service lives at 169.254.169.254 — multicast or reserved)."""
    mapped = getattr(address, "ipv4_mapped", None)
    if mapped is not None:
        address = mapped
    return address.is_global and not address.is_multicast


def check_webhook_url(url: str, *, allow_private: bool = False) -> Target:
    """Parse ``url`` or raise :class:`ConfigurationError` saying what is wrong.

    Messages never echo the URL: a webhook path often is itself a token.
    """
    if not isinstance(url, str) or not url or len(url) > MAX_URL:
        raise ConfigurationError(f"alerts: a webhook URL must be a string of 1-{MAX_URL} chars")
    if any(ch.isspace() or not ch.isprintable() for ch in url):
        raise ConfigurationError("alerts: a webhook URL must not contain spaces or controls")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ConfigurationError("alerts: a webhook URL could not be parsed") from None
    if parts.scheme not in ("http", "https"):
        raise ConfigurationError("alerts: a webhook URL must use http or https")
    if not parts.hostname:
        raise ConfigurationError("alerts: a webhook URL must name a host")
    if parts.username is not None or parts.password is not None:
        raise ConfigurationError("alerts: a webhook URL must not carry user:password@")
    if parts.fragment:
        raise ConfigurationError("alerts: a webhook URL must not have a #fragment")
    host = parts.hostname
    if not allow_private and not _may_be_public(host):
        raise ConfigurationError(
            "alerts: a webhook URL must not point at a private, loopback or link-local "
            "address (set allow_private for an internal receiver)"
        )
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    default = 443 if parts.scheme == "https" else 80
    return Target(parts.scheme, host, port or default, path)


def _may_be_public(host: str) -> bool:
    if host == "localhost" or host.endswith((".localhost", ".local", ".internal")):
        return False
    try:
        return is_public(ipaddress.ip_address(host))
    except ValueError:
        return True  # a name: its addresses are checked at every delivery


def resolve(host: str, port: int, *, allow_private: bool) -> str:
    """The address to connect to for ``host``: the first one, after checking all.

    Raises :class:`OSError` (retried) if the name does not resolve, and
    :class:`BlockedAddress` (not retried) if, unless ``allow_private``, any address
    it resolves to is not public — one is enough, since a resolver may hand them out
    in any order.
    """
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses = [str(info[4][0]) for info in infos]
    if not addresses:
        raise OSError("no address")
    if not allow_private:
        for text in addresses:
            if not is_public(ipaddress.ip_address(text.split("%", 1)[0])):
                raise BlockedAddress("webhook host resolves to a non-public address")
    return addresses[0]
