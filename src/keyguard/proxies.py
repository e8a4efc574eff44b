"""Which address a request came from, given the proxies this deployment trusts.

The socket peer is the only address nobody can forge. ``X-Forwarded-For`` and
``Forwarded`` are written by whoever sent the request, so they are read only when the
operator says which proxies append to them, and then only from the right: each proxy
appends the address it saw, so everything left of the last trusted hop is the
client's own claim.

.. versionadded:: 0.1
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Literal

from .errors import ConfigurationError, shown
from .iprules import MAX_ADDRESS_TEXT, IPAddress, IPNetworkSet, parse_ip
from .request import RequestInfo

__all__ = ["MAX_HOPS", "ClientAddress", "ForwardedHeader", "TrustedProxies"]

ForwardedHeader = Literal["x-forwarded-for", "forwarded"]

# No real deployment has more proxies than this between client and app. Walking at
# most this many entries bounds the work an attacker can cause with a huge header
# (SECURITY.md T90): ``rsplit`` with a limit never looks at the rest.
MAX_HOPS = 32
_OWS = " \t"
_ALL = ("*", "0.0.0.0/0", "::/0")
_logger = logging.getLogger("keyguard")


@dataclass(frozen=True, slots=True)
class ClientAddress:
    """The resolved client address, with the socket peer kept beside it for audit.

    :param ip: the client, normalised (IPv4-mapped IPv6 is IPv4; no zone id).
    :param peer: the socket peer exactly as the server reported it.
    """

    ip: IPAddress
    peer: str | None


class TrustedProxies:
    """The proxies whose forwarding headers this deployment believes.

    ``TrustedProxies()`` trusts none: the client is the socket peer (the default).

    ``TrustedProxies(hops=N)``: exactly N proxies append to the header; the client is
    the N-th entry from the right. With fewer than N entries the peer is used
    (werkzeug ``ProxyFix`` semantics).

    ``TrustedProxies(networks=["10.0.0.0/8"])``: when the peer is in a trusted
    network, walk the header right to left and take the first address that is not
    (uvicorn semantics). When every entry is trusted, the left-most one is the client.

    :param header: the one header family read; the other is ignored, since a proxy
        that writes one does not strip a forged copy of the other.
    :param allow_all: permit ``"*"``, ``0.0.0.0/0`` or ``::/0`` in ``networks``. A
        warning is logged at construction when they are used.

    **Security note**: trusting a network means trusting every host in it to write
    the header honestly. ``"*"`` makes the client's own, forgeable, claim decide its
    address, which defeats IP allow-lists and per-IP limits; it is refused unless
    ``allow_all=True``. Every entry keyguard reads must be a canonical address:
    ``unknown``, obfuscated identifiers, ports in ``X-Forwarded-For``
    (``1.2.3.4:5678``), brackets, non-canonical IPv4 (``010.0.0.1``, ``10.1``) and
    stray spaces are invalid. Meeting one where a trusted proxy should have written
    an address yields ``None`` (client unknown): IP-restricted keys are then refused
    and the request is never answered with a 500. The same happens when the peer is
    missing or not an IP address (a Unix socket), or when more than
    :data:`MAX_HOPS` entries are all trusted.

    In ``Forwarded`` a port is allowed and dropped (``for="[2001:db8::1]:443"``, as
    RFC 7239 defines nodes); in ``X-Forwarded-For``, which has no port syntax,
    ``ip:port`` is invalid. ``hops`` mode, like ``ProxyFix``, does not look at who
    the peer is: use it only where nothing can reach the app but the proxies.
    """

    __slots__ = ("_config", "_header", "_hops", "_lookup", "_trusted")

    def __init__(
        self,
        *,
        hops: int = 0,
        networks: Iterable[str] = (),
        header: ForwardedHeader = "x-forwarded-for",
        allow_all: bool = False,
    ) -> None:
        if isinstance(networks, str):
            raise ConfigurationError("networks must be a list of networks, not one string")
        names = tuple(networks)
        _check_hops(hops, names)
        if header not in ("x-forwarded-for", "forwarded"):
            raise ConfigurationError(
                f"header must be 'x-forwarded-for' or 'forwarded', not {shown(header)}"
            )
        self._hops = hops
        self._header = header.encode("ascii")
        self._trusted = _trusted_networks(names, allow_all=allow_all)
        # Parsing and the trust check, cached per address string: the same few proxies
        # and clients repeat, and a str key hashes far faster than an ip_address.
        self._lookup = lru_cache(maxsize=4096)(partial(_classify, self._trusted))
        self._config = (hops, names, header, allow_all)

    def __repr__(self) -> str:
        hops, names, header, allow_all = self._config
        return (
            f"TrustedProxies(hops={hops}, networks={list(names)}, header={header!r}, "
            f"allow_all={allow_all})"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TrustedProxies):
            return NotImplemented
        return self._config == other._config

    def __hash__(self) -> int:
        return hash(self._config)

    def client_ip(self, request: RequestInfo) -> ClientAddress | None:
        """The client's address, or ``None`` when it cannot be known safely.

        Never raises on request data.
        """
        peer = request.peer
        if peer is None or len(peer) > MAX_ADDRESS_TEXT:
            return None
        peer_ip, trusted = self._lookup(peer)
        if peer_ip is None:
            return None
        if self._hops:
            return self._by_hops(request, peer_ip)
        if not trusted:
            return ClientAddress(peer_ip, peer)
        return self._walk(request, peer_ip)

    def _by_hops(self, request: RequestInfo, peer_ip: IPAddress) -> ClientAddress | None:
        value = self._header_value(request)
        parts = value.rsplit(",", self._hops) if value is not None else []
        if len(parts) < self._hops:
            return ClientAddress(peer_ip, request.peer)
        ip, _ = self._entry(parts[-self._hops])
        return None if ip is None else ClientAddress(ip, request.peer)

    def _walk(self, request: RequestInfo, peer_ip: IPAddress) -> ClientAddress | None:
        value = self._header_value(request)
        if value is None:
            # A trusted proxy that forwarded nothing made the request itself.
            return ClientAddress(peer_ip, request.peer)
        parts = value.rsplit(",", MAX_HOPS)
        if len(parts) > MAX_HOPS:
            parts = parts[1:]  # the unsplit remainder is never looked at
            complete = False
        else:
            complete = True
        ip: IPAddress | None = None
        for part in reversed(parts):
            ip, trusted = self._entry(part)
            if ip is None:
                return None
            if not trusted:
                return ClientAddress(ip, request.peer)
        # Every entry is a trusted proxy: the left-most one is the client, unless the
        # chain was longer than we are willing to walk.
        return ClientAddress(ip, request.peer) if complete and ip is not None else None

    def _header_value(self, request: RequestInfo) -> str | None:
        name = self._header
        lines = [value for key, value in request.headers if key == name]
        if not lines:
            return None
        # Repeated lines are one list, in order (RFC 9110 §5.3); latin-1 never fails
        # and any non-ASCII byte then fails address parsing.
        return b",".join(lines).decode("latin-1")

    def _entry(self, entry: str) -> tuple[IPAddress | None, bool]:
        """The address of one header entry, and whether it is a trusted proxy."""
        if self._header == b"forwarded":
            ip = _forwarded_for(entry)
            return ip, ip is not None and ip in self._trusted
        text = entry.strip(_OWS)
        if len(text) > MAX_ADDRESS_TEXT:
            return None, False  # never parsed, never cached
        return self._lookup(text)


def _classify(trusted: IPNetworkSet, text: str) -> tuple[IPAddress | None, bool]:
    ip = parse_ip(text)
    return ip, ip is not None and ip in trusted


def _check_hops(hops: object, networks: tuple[str, ...]) -> None:
    if isinstance(hops, bool) or not isinstance(hops, int) or not 0 <= hops <= MAX_HOPS:
        raise ConfigurationError(f"hops must be a whole number from 0 to {MAX_HOPS}")
    if hops and networks:
        raise ConfigurationError("give either hops or networks, not both")


def _trusted_networks(names: tuple[str, ...], *, allow_all: bool) -> IPNetworkSet:
    everything = [name for name in names if name in _ALL]
    if everything and not allow_all:
        raise ConfigurationError(
            f"{shown(everything[0])} trusts every client to name its own address; "
            "list your proxies' networks, or pass allow_all=True if you really mean it"
        )
    if "*" in everything:
        names = (*(name for name in names if name != "*"), "0.0.0.0/0", "::/0")
    trusted = IPNetworkSet.from_cidrs(names)
    if trusted.covers_everything():
        _logger.warning(
            "TrustedProxies trusts every address: any client can choose the IP "
            "keyguard sees, so IP allow-lists and per-IP limits are not enforced"
        )
    return trusted


def _forwarded_for(element: str) -> IPAddress | None:
    """The address in one ``Forwarded`` element's single ``for=`` (RFC 7239)."""
    found: str | None = None
    for raw_pair in element.split(";"):
        pair = raw_pair.strip(_OWS)
        if not pair:
            continue  # the grammar allows empty pairs
        name, eq, value = pair.partition("=")
        if not eq:
            return None
        if name.lower() == "for":
            if found is not None:
                return None
            found = value
    if found is None:
        return None
    if found.startswith('"'):
        inner = found[1:-1]
        if len(found) < 2 or not found.endswith('"') or '"' in inner or "\\" in inner:
            return None
        return _node_ip(inner, quoted=True)
    return _node_ip(found, quoted=False)


def _node_ip(node: str, *, quoted: bool) -> IPAddress | None:
    """An RFC 7239 node: ``1.2.3.4``, ``"1.2.3.4:80"``, ``"[2001:db8::1]:443"``."""
    if node.startswith("["):
        end = node.find("]")
        host, rest = node[1:end], node[end + 1 :]
        if not quoted or end < 0 or ":" not in host or (rest and not _is_port(rest)):
            return None
        return parse_ip(host)
    host, colon, port = node.partition(":")
    if colon and not (quoted and _is_port(colon + port)):
        return None
    return parse_ip(host)


def _is_port(text: str) -> bool:
    port = text[1:]
    if not text.startswith(":") or not port or len(port) > 16 or not port.isascii():
        return False
    if port.isdigit():
        return len(port) <= 5
    return port.startswith("_") and port[1:].replace("-", "").replace(".", "").isalnum()
