"""IP allow- and deny-lists (SECURITY.md T56-T58)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keyguard.errors import ConfigurationError
from keyguard.iprules import (
    IPAddress,
    IPAllowList,
    IPDenyList,
    IPNetworkSet,
    normalise_ip,
    parse_ip,
    parse_network,
)

OFFICE = IPAllowList.from_cidrs(["203.0.113.0/24", "2001:db8::/32", "198.51.100.7"])


def ip(text: str) -> IPAddress:
    return ipaddress.ip_address(text)


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("203.0.113.9", True),
        ("203.0.114.1", False),
        ("198.51.100.7", True),
        ("198.51.100.8", False),
        ("2001:db8:1::1", True),
        ("2001:db9::1", False),
        ("::ffff:203.0.113.9", True),
        ("::ffff:198.51.100.7", True),
        ("::ffff:192.0.2.1", False),
    ],
)
def test_allow_list_membership(address: str, allowed: bool) -> None:
    """Networks and single addresses, IPv4 and IPv6, are matched after normalisation."""
    assert OFFICE.allows(ip(address)) is allowed


def test_t57_mapped_address_against_an_ipv4_network() -> None:
    """::ffff:10.1.2.3 is inside 10.0.0.0/8 only because it is normalised first."""
    mapped = ip("::ffff:10.1.2.3")
    assert mapped not in ipaddress.ip_network("10.0.0.0/8")  # the trap
    assert IPAllowList.from_cidrs(["10.0.0.0/8"]).allows(mapped)
    assert normalise_ip(mapped) == ip("10.1.2.3")


def test_t57_zone_ids_are_dropped() -> None:
    """A link-local address with a zone id matches and compares like the bare address."""
    scoped = ip("fe80::1%eth0")
    assert normalise_ip(scoped) == ip("fe80::1")
    assert IPAllowList.from_cidrs(["fe80::1"]).allows(scoped)
    assert IPAllowList.from_cidrs(["fe80::/64"]).allows(scoped)
    assert parse_ip("fe80::1%eth0") == ip("fe80::1")


@pytest.mark.parametrize(
    "cidr",
    ["10.0.0.1/8", "2001:db8::1/32", "010.0.0.0/8", "10.1", "0xA.0.0.0/8", " 10.0.0.0/8", ""],
)
def test_t57_host_bits_and_t56_non_canonical_networks_are_refused(cidr: str) -> None:
    """Strict parsing refuses host bits set and every ambiguous spelling."""
    with pytest.raises(ConfigurationError, match="not an IP network"):
        IPAllowList.from_cidrs([cidr])


@pytest.mark.parametrize("value", [167772161, None, b"10.0.0.0/8", "1" * 100])
def test_t56_non_strings_are_refused(value: object) -> None:
    """Integers, bytes and absurdly long values are not networks."""
    with pytest.raises(ConfigurationError):
        parse_network(value)


@pytest.mark.parametrize(
    "text", ["010.0.0.1", "10.1", "167772161", "0xA.0.0.1", " 1.2.3.4", "", "x" * 65]
)
def test_t56_non_canonical_addresses_do_not_parse(text: str) -> None:
    """parse_ip returns None for anything but a canonical address."""
    assert parse_ip(text) is None


def test_t58_unknown_client() -> None:
    """A None client is refused by a non-empty allow-list and allowed by an empty one."""
    assert not OFFICE.allows(None)
    assert IPAllowList.from_cidrs([]).allows(None)


def test_empty_allow_list_allows_everything() -> None:
    """A key without IP restrictions is usable from anywhere."""
    anywhere = IPAllowList.from_cidrs(())
    assert anywhere.allows(ip("192.0.2.1"))
    assert anywhere.allows(ip("2001:db8::1"))


def test_compiled_lists_are_cached_by_their_strings() -> None:
    """The same CIDR strings give the same compiled object, so per-request use is cheap."""
    first = IPNetworkSet.from_cidrs(["203.0.113.0/24", "10.0.0.0/8"])
    again = IPNetworkSet.from_cidrs(("203.0.113.0/24", "10.0.0.0/8"))
    assert first is again
    assert IPNetworkSet.from_cidrs(["10.0.0.0/8", "10.0.0.0/8"]).networks == (
        ipaddress.ip_network("10.0.0.0/8"),
    )


def test_mapped_networks_are_rewritten_as_ipv4() -> None:
    """An IPv4-mapped network in configuration matches the IPv4 addresses it denotes."""
    assert parse_network("::ffff:10.0.0.0/104") == ipaddress.ip_network("10.0.0.0/8")
    assert IPAllowList.from_cidrs(["::ffff:10.0.0.0/104"]).allows(ip("10.9.9.9"))


def test_one_string_is_not_a_list() -> None:
    """Passing a single CIDR string instead of a list is refused."""
    with pytest.raises(ConfigurationError, match="not one string"):
        IPAllowList.from_cidrs("10.0.0.0/8")


def test_non_addresses_are_never_members() -> None:
    """Membership of anything but an address object is False, not an error."""
    assert "203.0.113.9" not in OFFICE.networks
    assert None not in OFFICE.networks


def test_deny_list() -> None:
    """A deny-list blocks its networks, nothing when empty, and unknown clients by default."""
    deny = IPDenyList.from_cidrs(["192.0.2.0/24"])
    assert deny.blocks(ip("192.0.2.9"))
    assert deny.blocks(ip("::ffff:192.0.2.9"))
    assert not deny.blocks(ip("203.0.113.9"))
    assert deny.blocks(None)
    assert not IPDenyList.from_cidrs(["192.0.2.0/24"], block_unknown=False).blocks(None)
    assert not IPDenyList.from_cidrs([]).blocks(None)


def test_covers_everything() -> None:
    """A catch-all network is detected so callers can warn about it."""
    assert IPNetworkSet.from_cidrs(["0.0.0.0/0"]).covers_everything()
    assert not IPNetworkSet.from_cidrs(["10.0.0.0/8"]).covers_everything()


NETWORKS = st.one_of(
    st.ip_addresses(v=4).flatmap(
        lambda a: st.integers(0, 32).map(lambda p: ipaddress.ip_network(f"{a}/{p}", strict=False))
    ),
    st.ip_addresses(v=6).flatmap(
        lambda a: st.integers(0, 128).map(lambda p: ipaddress.ip_network(f"{a}/{p}", strict=False))
    ),
)


def reference(
    address: IPAddress, networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network]
) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    canonical = [
        ipaddress.IPv4Network((int(n.network_address) & 0xFFFFFFFF, n.prefixlen - 96))
        if isinstance(n, ipaddress.IPv6Network)
        and n.subnet_of(ipaddress.IPv6Network("::ffff:0:0/96"))
        else n
        for n in networks
    ]
    return any(address in n for n in canonical)


@given(
    networks=st.lists(NETWORKS, min_size=1, max_size=6),
    address=st.one_of(
        st.ip_addresses(),
        st.ip_addresses(v=4).map(lambda a: ipaddress.ip_address(f"::ffff:{a}")),
    ),
)
def test_allow_list_agrees_with_ipaddress(
    networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network], address: IPAddress
) -> None:
    """allows() equals ipaddress membership once mapped addresses are normalised."""
    allow = IPAllowList.from_cidrs([str(n) for n in networks])
    assert allow.allows(address) is reference(address, networks)
