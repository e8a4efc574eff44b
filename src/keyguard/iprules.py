"""IP allow- and deny-lists, compiled once and checked in a few hundred nanoseconds.

Every address is normalised before it is compared: an IPv4-mapped IPv6 address
(``::ffff:10.1.2.3``) becomes the IPv4 address it carries, and an IPv6 zone id
(``fe80::1%eth0``) is dropped. Without this, ``ip in network`` is silently ``False``
across IP versions (checked on CPython 3.11), so a dual-stack socket would fail every
IPv4 rule, and zone ids would make one host look like many.

Networks are parsed strictly: host bits set (``10.0.0.1/8``), leading zeros
(``010.0.0.1``), short forms (``10.1``) and integers are refused with
:class:`~keyguard.errors.ConfigurationError`.

.. versionadded:: 0.1
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TypeAlias

from .errors import ConfigurationError, shown

__all__ = [
    "IPAddress",
    "IPAllowList",
    "IPDenyList",
    "IPNetwork",
    "IPNetworkSet",
    "normalise_ip",
    "parse_ip",
    "parse_network",
]

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network

# The longest textual address worth parsing: a full IPv6 address with an embedded
# IPv4 tail (45 characters) plus a zone id. Longer strings are refused unparsed, so
# an attacker cannot make us parse (or cache) a 100 KiB "address".
MAX_ADDRESS_TEXT = 64
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def normalise_ip(ip: IPAddress) -> IPAddress:
    """``ip`` with its zone id dropped and an IPv4-mapped address turned into IPv4."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id is not None:
            ip = ipaddress.IPv6Address(int(ip))
        mapped = ip.ipv4_mapped
        if mapped is not None:
            return mapped
    return ip


@lru_cache(maxsize=4096)
def _parse_ip_cached(text: str) -> IPAddress | None:
    try:
        return normalise_ip(ipaddress.ip_address(text))
    except ValueError:
        return None


def parse_ip(text: str) -> IPAddress | None:
    """A canonical textual address, normalised; ``None`` for anything else.

    Never raises: request data goes through here. Results are cached (bounded), as
    the same few peers and proxies repeat on every request.
    """
    if not 0 < len(text) <= MAX_ADDRESS_TEXT:
        return None
    return _parse_ip_cached(text)


def parse_network(value: object) -> IPNetwork:
    """One CIDR or single address from configuration, strictly parsed.

    An IPv4-mapped IPv6 network (``::ffff:10.0.0.0/104``) is rewritten as the IPv4
    network it denotes, since addresses are compared after :func:`normalise_ip`.

    :raises ConfigurationError: naming the value, when it is not a network.
    """
    if not isinstance(value, str) or len(value) > MAX_ADDRESS_TEXT:
        raise ConfigurationError(f"{shown(value)} is not an IP network (like 203.0.113.0/24)")
    try:
        network = ipaddress.ip_network(value, strict=True)
    except ValueError:
        raise ConfigurationError(
            f"{shown(value)} is not an IP network (like 203.0.113.0/24, host bits zero)"
        ) from None
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_MAPPED):
        return ipaddress.IPv4Network(
            (int(network.network_address) & 0xFFFFFFFF, network.prefixlen - 96)
        )
    return network


@dataclass(frozen=True, slots=True)
class IPNetworkSet:
    """A compiled set of networks; ``ip in networks`` after normalisation.

    Single addresses go into a hash set; only real networks are scanned.
    """

    networks: tuple[IPNetwork, ...]
    _hosts: frozenset[IPAddress] = field(init=False, repr=False, compare=False)
    # Each real network as (version, netmask, network address) integers: an address is
    # in it when its version matches and its integer masked is the network's (what
    # ``ip in network`` computes, through several Python calls).
    _ranges: tuple[tuple[int, int, int], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        hosts = frozenset(
            n.network_address for n in self.networks if n.prefixlen == n.max_prefixlen
        )
        ranges = tuple(
            (n.version, int(n.netmask), int(n.network_address))
            for n in self.networks
            if n.prefixlen != n.max_prefixlen
        )
        object.__setattr__(self, "_hosts", hosts)
        object.__setattr__(self, "_ranges", ranges)

    @classmethod
    def from_cidrs(cls, cidrs: Iterable[str]) -> IPNetworkSet:
        """Compile ``cidrs``; the same tuple of strings is compiled only once."""
        if isinstance(cidrs, str):
            raise ConfigurationError("expected a list of networks, not one string")
        return _compile(tuple(cidrs))

    def __contains__(self, ip: object) -> bool:
        if isinstance(ip, ipaddress.IPv4Address):
            version = 4
        elif isinstance(ip, ipaddress.IPv6Address):
            ip = normalise_ip(ip)
            version = ip.version
        else:
            return False
        if self._hosts and ip in self._hosts:
            return True
        value = int(ip)
        for family, mask, network in self._ranges:
            if family == version and value & mask == network:
                return True
        return False

    def __len__(self) -> int:
        return len(self.networks)

    def covers_everything(self) -> bool:
        """Whether a whole address family is in the set (``0.0.0.0/0`` or ``::/0``)."""
        return any(n.prefixlen == 0 for n in self.networks)


@lru_cache(maxsize=1024)
def _compile(cidrs: tuple[str, ...]) -> IPNetworkSet:
    networks: list[IPNetwork] = []
    for cidr in cidrs:
        network = parse_network(cidr)
        if network not in networks:
            networks.append(network)
    return IPNetworkSet(tuple(networks))


@dataclass(frozen=True, slots=True)
class IPAllowList:
    """The networks a key may be used from; an empty list allows every client.

    Build it from a key record's CIDR strings with :meth:`from_cidrs`; compiled lists
    are cached by their strings, so building one per request is cheap.

    **Security note**: a client whose address is unknown (``None``: no peer, a Unix
    socket, or a forwarded chain that could not be trusted) is refused by any
    non-empty allow-list. That is the fail-closed reading of SECURITY.md T58.
    """

    networks: IPNetworkSet

    @classmethod
    def from_cidrs(cls, cidrs: Iterable[str]) -> IPAllowList:
        """An allow-list of ``cidrs`` (e.g. ``["203.0.113.0/24", "2001:db8::/32"]``).

        :raises ConfigurationError: when an entry is not a strictly valid network.
            Stored key records are validated on write
            (:func:`keyguard.validation.validate_cidrs`), so this does not happen on
            the request path unless the store holds data keyguard did not write.
        """
        return cls(IPNetworkSet.from_cidrs(cidrs))

    def allows(self, ip: IPAddress | None) -> bool:
        """Whether a client at ``ip`` may use the key."""
        if not self.networks:
            return True
        return ip is not None and ip in self.networks


@dataclass(frozen=True, slots=True)
class IPDenyList:
    """Deployment-wide networks that are refused before any key is looked at.

    :param block_unknown: refuse clients whose address is unknown. On by default
        (fail closed): an attacker who could make their address unresolvable must not
        slip past the list. Turn it off only where no address is ever known (a
        Unix-socket deployment with no trusted proxy) and say so in the docs.
    """

    networks: IPNetworkSet
    block_unknown: bool = True

    @classmethod
    def from_cidrs(cls, cidrs: Iterable[str], *, block_unknown: bool = True) -> IPDenyList:
        """A deny-list of ``cidrs``; raises :class:`ConfigurationError` on a bad entry."""
        return cls(IPNetworkSet.from_cidrs(cidrs), block_unknown)

    def blocks(self, ip: IPAddress | None) -> bool:
        """Whether a client at ``ip`` is refused; an empty list blocks nobody."""
        if not self.networks:
            return False
        if ip is None:
            return self.block_unknown
        return ip in self.networks
