"""Which IP addresses are public: the one classification the domain proxy and the HTTP service share.

The ranges come from the IANA special-purpose address registries (RFC 6890 and its updates) and are
listed here rather than taken from ``ipaddress``'s ``is_global``, whose tables differ between Python
versions and miss IPv6 forms that carry an IPv4 address. An IPv6 address that embeds an IPv4 one
(RFC 4291 mapped and compatible, SIIT, NAT64 per RFC 6052 and 8215, 6to4 per RFC 3056, Teredo per
RFC 4380) is judged by that IPv4 address: a translator or relay delivers its packets there.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network


class Kind(enum.Enum):
    """What a special-purpose range is for, as a refusal names it."""

    UNSPECIFIED = "unspecified"
    THIS_NETWORK = "'this network'"
    LOOPBACK = "loopback"
    PRIVATE = "private"
    UNIQUE_LOCAL = "unique local, private"
    SHARED = "shared, carrier-grade NAT"
    LINK_LOCAL = "link-local"
    SITE_LOCAL = "site-local, deprecated"
    MULTICAST = "multicast"
    DOCUMENTATION = "documentation"
    BENCHMARKING = "benchmarking"
    RESERVED = "reserved"
    NOT_GLOBAL_UNICAST = "reserved, outside global unicast"


_V4: tuple[tuple[IPv4Network, Kind], ...] = tuple(
    (IPv4Network(network), kind)
    for network, kind in (
        ("0.0.0.0/32", Kind.UNSPECIFIED),
        ("0.0.0.0/8", Kind.THIS_NETWORK),
        ("10.0.0.0/8", Kind.PRIVATE),
        ("100.64.0.0/10", Kind.SHARED),
        ("127.0.0.0/8", Kind.LOOPBACK),
        ("169.254.0.0/16", Kind.LINK_LOCAL),
        ("172.16.0.0/12", Kind.PRIVATE),
        ("192.0.0.0/24", Kind.RESERVED),  # IETF protocol assignments (with its two anycast services)
        ("192.0.2.0/24", Kind.DOCUMENTATION),
        ("192.88.99.0/24", Kind.RESERVED),  # the deprecated 6to4 relay anycast
        ("192.168.0.0/16", Kind.PRIVATE),
        ("198.18.0.0/15", Kind.BENCHMARKING),
        ("198.51.100.0/24", Kind.DOCUMENTATION),
        ("203.0.113.0/24", Kind.DOCUMENTATION),
        ("224.0.0.0/4", Kind.MULTICAST),
        ("240.0.0.0/4", Kind.RESERVED),  # and the broadcast address 255.255.255.255
    )
)
"""IPv4 special-purpose ranges, the most specific first; every other IPv4 address is public."""

_V6_ZERO: tuple[tuple[IPv6Network, Kind], ...] = (
    (IPv6Network("::/128"), Kind.UNSPECIFIED),
    (IPv6Network("::1/128"), Kind.LOOPBACK),
)
"""The two IPv6 addresses inside ::/96 that are not IPv4-compatible ones."""

_V6: tuple[tuple[IPv6Network, Kind], ...] = tuple(
    (IPv6Network(network), kind)
    for network, kind in (
        ("100::/64", Kind.RESERVED),  # discard-only
        ("2001:2::/48", Kind.BENCHMARKING),
        # IETF protocol assignments; the few anycast services in it are refused with the rest (fail closed).
        ("2001::/23", Kind.RESERVED),
        ("2001:db8::/32", Kind.DOCUMENTATION),
        ("3fff::/20", Kind.DOCUMENTATION),
        ("fc00::/7", Kind.UNIQUE_LOCAL),
        ("fe80::/10", Kind.LINK_LOCAL),
        ("fec0::/10", Kind.SITE_LOCAL),
        ("ff00::/8", Kind.MULTICAST),
    )
)
"""IPv6 special-purpose ranges, the most specific first (checked after the embedding forms)."""

_GLOBAL_UNICAST = IPv6Network("2000::/3")
"""The only IPv6 space IANA allocates for global unicast; outside it, an address embedding no IPv4 one is reserved."""


class Form(enum.Enum):
    """An IPv6 form that carries an IPv4 address, with its prefix."""

    MAPPED = ("IPv4-mapped", "::ffff:0:0/96")
    TRANSLATED = ("SIIT IPv4-translated", "::ffff:0:0:0/96")
    COMPATIBLE = ("IPv4-compatible", "::/96")
    NAT64 = ("NAT64", "64:ff9b::/96")
    LOCAL_NAT64 = ("local-use NAT64", "64:ff9b:1::/48")
    SIX_TO_FOUR = ("6to4", "2002::/16")
    TEREDO = ("Teredo", "2001::/32")

    def __init__(self, label: str, prefix: str) -> None:
        self.label = label
        self.prefix = IPv6Network(prefix)


_RFC6052_LENGTHS = (48, 56, 64, 96)
"""RFC 6052 prefix lengths a network may use inside 64:ff9b:1::/48; the proxy cannot know which it uses."""


def _rfc6052_ipv4(value: int, length: int) -> IPv4Address | None:
    """The IPv4 address in ``value`` read with an RFC 6052 prefix of ``length`` bits, or None when that
    reading is not a valid one (bits 64-71, the "u" octet, and the suffix must be zero)."""
    if length == 96:
        return IPv4Address(value & 0xFFFFFFFF)
    if (value >> 56) & 0xFF:
        return None
    # Drop the u octet: the prefix, the IPv4 address and the suffix are then contiguous, in 120 bits.
    joined = ((value >> 64) << 56) | (value & ((1 << 56) - 1))
    suffix_bits = 120 - length - 32
    if joined & ((1 << suffix_bits) - 1):
        return None
    return IPv4Address((joined >> suffix_bits) & 0xFFFFFFFF)


def _embedded_ipv4(ip: IPv6Address) -> tuple[Form, tuple[IPv4Address, ...]] | None:
    """The form ``ip`` is written in and every IPv4 address it may deliver to, or None if it embeds none.

    Teredo carries two (its server and, obfuscated, its client); a local-use NAT64 address one per
    prefix length that reads validly.
    """
    value = int(ip)
    if ip.ipv4_mapped is not None:
        return Form.MAPPED, (ip.ipv4_mapped,)
    if ip in Form.TRANSLATED.prefix:
        return Form.TRANSLATED, (IPv4Address(value & 0xFFFFFFFF),)
    if ip in Form.COMPATIBLE.prefix:
        return Form.COMPATIBLE, (IPv4Address(value),)
    if ip in Form.NAT64.prefix:
        return Form.NAT64, (IPv4Address(value & 0xFFFFFFFF),)
    if ip in Form.LOCAL_NAT64.prefix:
        readings = (_rfc6052_ipv4(value, length) for length in _RFC6052_LENGTHS)
        return Form.LOCAL_NAT64, tuple(dict.fromkeys(ipv4 for ipv4 in readings if ipv4 is not None))
    if ip.sixtofour is not None:
        return Form.SIX_TO_FOUR, (ip.sixtofour,)
    if ip.teredo is not None:
        return Form.TEREDO, ip.teredo
    return None


@dataclass(frozen=True)
class Special:
    """Why an address is not public: the special-purpose range it (or the IPv4 address it embeds) is in."""

    kind: Kind
    network: IPNetwork
    ipv4: IPv4Address | None = None
    """The embedded IPv4 address in ``network``, when the address was judged by one."""
    form: Form | None = None
    """The IPv6 form that embeds ``ipv4``."""

    def __str__(self) -> str:
        if self.form is None or self.ipv4 is None:
            return f"{self.kind.value} ({self.network})"
        form = f"{self.form.label} form ({self.form.prefix})"
        return f"{self.ipv4} in {form}, which is {self.kind.value} ({self.network})"


def parse(text: str) -> IPAddress | None:
    """The IP address ``text`` spells (brackets allowed), IPv4-mapped IPv6 read as the IPv4 address it is
    on a dual-stack socket; None if it is not an address (a name)."""
    try:
        ip = ip_address(text.removeprefix("[").removesuffix("]"))
    except ValueError:
        return None
    if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def special(address: str | IPAddress, *, embedded: bool = True) -> Special | None:
    """Why ``address`` is not a public address, or None when it is one (global unicast).

    IPv4-mapped IPv6 is always judged as its IPv4 address: on a dual-stack socket it is that address.
    With ``embedded`` (right for a destination), so are the other forms that embed an IPv4 address, since
    a translator or relay delivers their packets to it; without (right for the address a socket listens
    on or a peer came from), they are judged as IPv6 addresses, which makes them reserved, not loopback.
    Raises ValueError if ``address`` is not an IP address.
    """
    ip = ip_address(address.partition("%")[0]) if isinstance(address, str) else address
    if isinstance(ip, IPv4Address):
        return _special_ipv4(ip)
    for network, kind in _V6_ZERO:
        if ip in network:
            return Special(kind, network)
    carried = _embedded_ipv4(ip)
    if carried is not None and (embedded or carried[0] is Form.MAPPED):
        form, ipv4s = carried
        for ipv4 in ipv4s:
            found = _special_ipv4(ipv4)
            if found is not None:
                return Special(found.kind, found.network, ipv4, form)
        return None
    for network, kind in _V6:
        if ip in network:
            return Special(kind, network)
    if ip not in _GLOBAL_UNICAST:
        return Special(Kind.NOT_GLOBAL_UNICAST, _GLOBAL_UNICAST)
    return None


def _special_ipv4(ip: IPv4Address) -> Special | None:
    for network, kind in _V4:
        if ip in network:
            return Special(kind, network)
    return None


LOOPBACK_NAMES = ("localhost",)
"""Host names that are loopback by definition (RFC 6761); any other name counts as not loopback."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address a socket listens on or a peer came from) is this machine's
    loopback. IPv4-mapped loopback counts (a dual-stack socket shows a local IPv4 client so); an address
    that only embeds 127.0.0.1 for a translator (NAT64, 6to4, ...) does not: it is not this machine."""
    if host.lower().removesuffix(".") in LOOPBACK_NAMES:
        return True
    ip = parse(host)
    if ip is None:
        return False
    found = special(ip, embedded=False)
    return found is not None and found.kind is Kind.LOOPBACK
