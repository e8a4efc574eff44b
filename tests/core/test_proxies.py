"""Client address resolution behind proxies (SECURITY.md C6, T51-T59, T90)."""

from __future__ import annotations

import ipaddress
import logging
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keyguard.errors import ConfigurationError
from keyguard.proxies import MAX_HOPS, ClientAddress, TrustedProxies
from keyguard.request import RequestInfo

NONE = TrustedProxies()
LAN = TrustedProxies(networks=["10.0.0.0/8", "2001:db8:ffff::/48"])
TWO_HOPS = TrustedProxies(hops=2)
FORWARDED = TrustedProxies(networks=["10.0.0.0/8"], header="forwarded")


def request(peer: str | None, *lines: str, header: bytes = b"x-forwarded-for") -> RequestInfo:
    headers = tuple((header, line.encode("latin-1")) for line in lines)
    return RequestInfo("GET", "/", headers=((b"host", b"api"), *headers), peer=peer)


def resolved(proxies: TrustedProxies, req: RequestInfo) -> str | None:
    address = proxies.client_ip(req)
    return None if address is None else str(address.ip)


def test_t51_no_trusted_proxy_uses_the_peer() -> None:
    """By default forwarding headers are ignored and the socket peer is the client."""
    req = request("198.51.100.7", "203.0.113.9")
    assert NONE.client_ip(req) == ClientAddress(
        ipaddress.ip_address("198.51.100.7"), "198.51.100.7"
    )


def test_t51_untrusted_peer_headers_are_ignored() -> None:
    """A peer outside the trusted networks cannot choose its address through XFF."""
    assert resolved(LAN, request("198.51.100.7", "203.0.113.9")) == "198.51.100.7"


def test_t52_trusted_proxy_spoofed_leftmost_entry() -> None:
    """The right-most untrusted entry wins; the forged left-most one is ignored."""
    address = LAN.client_ip(request("10.0.0.2", "10.1.1.1, 203.0.113.9"))
    assert address == ClientAddress(ipaddress.ip_address("203.0.113.9"), "10.0.0.2")
    assert resolved(LAN, request("10.0.0.2", "6.6.6.6, 203.0.113.9, 10.0.0.5")) == "203.0.113.9"


def test_t52_all_entries_trusted_gives_the_leftmost() -> None:
    """When every hop is a trusted proxy, the client is the first address in the chain."""
    assert resolved(LAN, request("10.0.0.2", "10.9.9.9, 10.0.0.5")) == "10.9.9.9"


def test_t52_trusted_proxy_without_header_is_the_client() -> None:
    """A trusted proxy that forwards nothing made the request itself."""
    assert resolved(LAN, request("10.0.0.2")) == "10.0.0.2"


def test_t52_hops_take_the_nth_entry_from_the_right() -> None:
    """hops=2 reads values[-2]; with fewer values the peer is used (ProxyFix)."""
    assert resolved(TWO_HOPS, request("192.0.2.1", "6.6.6.6, 203.0.113.9, 10.0.0.5")) == (
        "203.0.113.9"
    )
    assert resolved(TWO_HOPS, request("192.0.2.1", "203.0.113.9")) == "192.0.2.1"
    assert resolved(TWO_HOPS, request("192.0.2.1")) == "192.0.2.1"
    assert resolved(TrustedProxies(hops=1), request("192.0.2.1", "6.6.6.6, 203.0.113.9")) == (
        "203.0.113.9"
    )


@pytest.mark.parametrize("network", ["*", "0.0.0.0/0", "::/0"])
def test_t53_refuse_trust_everything(network: str) -> None:
    """Trusting every address is refused unless explicitly allowed."""
    with pytest.raises(ConfigurationError, match="allow_all"):
        TrustedProxies(networks=[network])


def test_t53_allow_all_warns_and_trusts_the_leftmost(caplog: pytest.LogCaptureFixture) -> None:
    """allow_all=True logs a warning at construction, then every hop is trusted."""
    with caplog.at_level(logging.WARNING, logger="keyguard"):
        everyone = TrustedProxies(networks=["*"], allow_all=True)
    assert any("trusts every address" in r.getMessage() for r in caplog.records)
    assert resolved(everyone, request("198.51.100.7", "6.6.6.6, 203.0.113.9")) == "6.6.6.6"
    assert resolved(everyone, request("2001:db8::1", "2001:db8::9")) == "2001:db8::9"


def test_t53_allow_all_without_a_catch_all_does_not_warn(caplog: pytest.LogCaptureFixture) -> None:
    """Passing allow_all alone changes nothing and logs nothing."""
    with caplog.at_level(logging.WARNING, logger="keyguard"):
        TrustedProxies(networks=["10.0.0.0/8"], allow_all=True)
    assert not caplog.records


def test_t54_several_xff_lines_are_joined_in_order() -> None:
    """Split header lines give the same answer as one comma-joined line."""
    for proxies in (LAN, TWO_HOPS):
        one = proxies.client_ip(request("10.0.0.2", "6.6.6.6, 203.0.113.9, 10.0.0.5"))
        split = proxies.client_ip(request("10.0.0.2", "6.6.6.6", "203.0.113.9", "10.0.0.5"))
        assert one == split
    assert resolved(LAN, request("10.0.0.2", "203.0.113.9", "10.0.0.5")) == "203.0.113.9"


@pytest.mark.parametrize(
    "entry", ["unknown", "", " ", "1.2.3.4:5678", "[2001:db8::1]:443", "[2001:db8::1]", "_hidden"]
)
def test_t55_junk_in_xff(entry: str) -> None:
    """An invalid entry where a trusted proxy should have written an address yields None."""
    assert LAN.client_ip(request("10.0.0.2", f"203.0.113.9, {entry}")) is None
    assert TrustedProxies(hops=1).client_ip(request("10.0.0.2", f"203.0.113.9, {entry}")) is None


def test_t55_junk_left_of_the_client_is_never_read() -> None:
    """Garbage a client adds before the proxy's entry cannot change the answer."""
    assert resolved(LAN, request("10.0.0.2", "unknown, [::1]:80, 203.0.113.9")) == "203.0.113.9"


def test_t55_only_the_configured_family_is_read() -> None:
    """A Forwarded header is ignored when XFF is configured, and vice versa."""
    forged = request("10.0.0.2", "for=6.6.6.6", header=b"forwarded")
    assert resolved(LAN, forged) == "10.0.0.2"
    assert resolved(FORWARDED, request("10.0.0.2", "6.6.6.6")) == "10.0.0.2"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("for=203.0.113.9", "203.0.113.9"),
        ('For="203.0.113.9:8080";proto=https', "203.0.113.9"),
        ('for="[2001:db8::1]:443"', "2001:db8::1"),
        ('for="[2001:db8::1]"', "2001:db8::1"),
        ('for="203.0.113.9:_obf";by=10.0.0.2', "203.0.113.9"),
        ("for=6.6.6.6, for=203.0.113.9;;proto=http", "203.0.113.9"),
        ('for=6.6.6.6, for="[::ffff:203.0.113.9]"', "203.0.113.9"),
        ("for=203.0.113.9, for=10.0.0.5", "203.0.113.9"),
    ],
)
def test_t55_forwarded_header(value: str, expected: str) -> None:
    """RFC 7239 for= nodes are read right to left, with quoted IPv6 and ports."""
    assert resolved(FORWARDED, request("10.0.0.2", value, header=b"forwarded")) == expected


@pytest.mark.parametrize(
    "value",
    [
        "for=unknown",
        "for=_hidden",
        "for=203.0.113.9:80",
        "for=[2001:db8::1]",
        'for="2001:db8::1"',
        'for="[2001:db8::1]:http"',
        'for="[1.2.3.4]"',
        'for="203.0.113.9',
        'for="a\\"b"',
        "for=203.0.113.9;for=203.0.113.8",
        "proto=https",
        "for",
        'for="[2001:db8::1"',
    ],
)
def test_t55_invalid_forwarded_nodes(value: str) -> None:
    """Obfuscated, unknown, ambiguous or ill-quoted nodes are never trusted."""
    assert FORWARDED.client_ip(request("10.0.0.2", value, header=b"forwarded")) is None


@pytest.mark.parametrize(
    "entry", ["010.0.0.1", "10.1", "167772161", "0xA.0.0.1", "1.2. 3.4", "1.2.3.4%x"]
)
def test_t56_non_canonical_ip_strings(entry: str) -> None:
    """Ambiguous IPv4 spellings are invalid in headers and as the peer."""
    assert LAN.client_ip(request("10.0.0.2", entry)) is None
    assert NONE.client_ip(request(entry)) is None


@pytest.mark.parametrize(
    "network", ["010.0.0.0/8", "10.1/16", "167772161", " 10.0.0.0/8", "10.0.0.1/8"]
)
def test_t56_non_canonical_networks_are_refused(network: str) -> None:
    """Configuration is parsed strictly: no leading zeros, short forms, integers or host bits."""
    with pytest.raises(ConfigurationError, match="not an IP network"):
        TrustedProxies(networks=[network])


def test_t57_address_normalisation() -> None:
    """IPv4-mapped peers and entries become IPv4, and zone ids are dropped."""
    mapped = LAN.client_ip(request("::ffff:10.0.0.2", "::ffff:203.0.113.9"))
    assert mapped == ClientAddress(ipaddress.ip_address("203.0.113.9"), "::ffff:10.0.0.2")
    assert resolved(NONE, request("fe80::1%eth0")) == "fe80::1"
    assert resolved(LAN, request("2001:db8:ffff::1", "2001:db8::9%eth0")) == "2001:db8::9"
    mapped_net = TrustedProxies(networks=["::ffff:10.0.0.0/104"])
    assert resolved(mapped_net, request("10.0.0.2", "203.0.113.9")) == "203.0.113.9"


@pytest.mark.parametrize("peer", [None, "", "/run/app.sock", "unix:/run/app.sock", "localhost"])
def test_t58_no_client_address(peer: str | None) -> None:
    """A missing or non-IP peer yields None in every mode, so IP rules fail closed."""
    for proxies in (NONE, LAN, TWO_HOPS):
        assert proxies.client_ip(request(peer, "203.0.113.9, 10.0.0.5, 10.0.0.6")) is None


def test_t59_rotating_xff_does_not_change_the_client() -> None:
    """Whatever a client puts in XFF, the resolved address stays the same."""
    for forged in ("1.1.1.1", "2.2.2.2, 3.3.3.3", "10.0.0.9", "junk"):
        assert resolved(NONE, request("203.0.113.9", forged)) == "203.0.113.9"
        assert resolved(LAN, request("10.0.0.2", f"{forged}, 203.0.113.9")) == "203.0.113.9"


def test_chain_longer_than_max_hops_is_not_trusted() -> None:
    """A chain of trusted proxies longer than MAX_HOPS yields None rather than a guess."""
    chain = ", ".join(["10.0.0.9"] * (MAX_HOPS + 1))
    assert LAN.client_ip(request("10.0.0.2", chain)) is None
    exact = ", ".join(["10.0.0.9"] * MAX_HOPS)
    assert resolved(LAN, request("10.0.0.2", exact)) == "10.0.0.9"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"hops": 1, "networks": ["10.0.0.0/8"]},
        {"hops": -1},
        {"hops": MAX_HOPS + 1},
        {"hops": True},
        {"networks": "10.0.0.0/8"},
        {"header": "x-real-ip"},
        {"networks": [10]},
    ],
)
def test_configuration_is_validated(kwargs: dict[str, object]) -> None:
    """Contradictory or malformed settings raise ConfigurationError."""
    with pytest.raises(ConfigurationError):
        TrustedProxies(**kwargs)  # type: ignore[arg-type]


def test_value_object_equality_and_repr() -> None:
    """Equal settings compare equal; the repr shows the settings."""
    assert TrustedProxies(hops=2) == TWO_HOPS
    assert hash(TrustedProxies(hops=2)) == hash(TWO_HOPS)
    assert TrustedProxies(hops=2) != NONE
    assert TWO_HOPS != "hops=2"
    assert "hops=2" in repr(TWO_HOPS)


ADVERSARIAL = 100 * 1024


@pytest.mark.parametrize(
    ("proxies", "value", "header"),
    [
        (LAN, "10.0.0.9, " * (ADVERSARIAL // 10), b"x-forwarded-for"),
        (LAN, "," * ADVERSARIAL, b"x-forwarded-for"),
        (LAN, "1" * ADVERSARIAL, b"x-forwarded-for"),
        (LAN, "1." * (ADVERSARIAL // 2), b"x-forwarded-for"),
        (TWO_HOPS, "::" * (ADVERSARIAL // 2) + ", 1.2.3.4", b"x-forwarded-for"),
        (FORWARDED, "for=10.0.0.9;" * (ADVERSARIAL // 13), b"forwarded"),
        (FORWARDED, 'for="[' * (ADVERSARIAL // 6), b"forwarded"),
        (FORWARDED, "for=10.0.0.9," * (ADVERSARIAL // 13), b"forwarded"),
    ],
)
def test_t90_no_super_linear_parsing(proxies: TrustedProxies, value: str, header: bytes) -> None:
    """100 KiB adversarial forwarding headers resolve in under 10 ms."""
    req = request("10.0.0.2", value, header=header)
    timings = []
    for _ in range(3):
        start = time.perf_counter()
        proxies.client_ip(req)
        timings.append(time.perf_counter() - start)
    assert min(timings) < 0.01


ENTRY = st.one_of(
    st.ip_addresses().map(str),
    st.sampled_from(
        ["unknown", "", "_x", "[::1]:80", "10.0.0.9", "for=", '"', ";", "::ffff:10.0.0.1"]
    ),
    st.text(max_size=12),
)


@given(
    entries=st.lists(ENTRY, max_size=6),
    peer=st.one_of(st.none(), st.ip_addresses().map(str), st.text(max_size=10)),
    raw=st.binary(max_size=40),
)
def test_random_forwarding_headers_never_raise(
    entries: list[str], peer: str | None, raw: bytes
) -> None:
    """Any header and peer give a ClientAddress or None, never an exception."""
    text = ", ".join(entries)
    for proxies in (NONE, LAN, TWO_HOPS, FORWARDED):
        for header in (b"x-forwarded-for", b"forwarded"):
            req = RequestInfo(
                "GET",
                "/",
                headers=((header, text.encode("utf-8", "surrogatepass")), (header, raw)),
                peer=peer,
            )
            result = proxies.client_ip(req)
            assert result is None or isinstance(result, ClientAddress)
            if result is not None:
                assert result.ip.version == 4 or result.ip.ipv4_mapped is None


@given(addresses=st.lists(st.ip_addresses(), min_size=1, max_size=5))
def test_hops_agree_with_indexing(
    addresses: list[ipaddress.IPv4Address | ipaddress.IPv6Address],
) -> None:
    """hops=N picks the N-th valid address from the right, exactly as indexing would."""
    req = request("192.0.2.1", ", ".join(map(str, addresses)))
    for hops in range(1, 7):
        expected = addresses[-hops] if len(addresses) >= hops else ipaddress.ip_address("192.0.2.1")
        if isinstance(expected, ipaddress.IPv6Address) and expected.ipv4_mapped is not None:
            expected = expected.ipv4_mapped
        assert TrustedProxies(hops=hops).client_ip(req) == ClientAddress(expected, "192.0.2.1")
