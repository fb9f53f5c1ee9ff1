"""SSRF guard: keep the crawler away from loopback, private and metadata addresses.

A crawler fetches URLs that strangers wrote (links, redirects), so without a guard a
page can point it at http://169.254.169.254/ (cloud credentials) or an admin panel on
10.0.0.0/8 and have the answer stored in our WARCs.

Residual risk (DNS rebinding, a time-of-check/time-of-use gap): we resolve the name
here, then httpx resolves it again when it connects. A hostile DNS server can answer
a public address to us and 127.0.0.1 to httpx. The crawler narrows this by checking
the address it actually connected to (`server_addr` of the stream) before it reads or
stores a body, but by then the GET has been sent. Closing the gap fully needs a
transport that connects to the very address checked here (pinning); we do not have it.
"""
from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_CGNAT = ipaddress.ip_network("100.64.0.0/10")        # carrier-grade NAT, RFC 6598
_NAT64 = ipaddress.ip_network("64:ff9b::/96")         # well-known NAT64 prefix, RFC 6052


class RefusedAddress(Exception):
    """The URL's host is (or resolves to) an address we must not connect to."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _parse_ip(ip: str | IPAddress) -> IPAddress:
    if isinstance(ip, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return ip
    return ipaddress.ip_address(ip.strip("[]").split("%", 1)[0])   # drop an IPv6 zone id


def _embedded_v4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 form carries to (or is translated to), if any."""
    if ip.ipv4_mapped is not None:                     # ::ffff:10.0.0.1
        return ip.ipv4_mapped
    if ip.sixtofour is not None:                       # 2002:0a00:0001::/48
        return ip.sixtofour
    if ip in _NAT64:                                   # 64:ff9b::10.0.0.1
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def is_forbidden_ip(ip: str | IPAddress) -> str | None:
    """Why `ip` must not be contacted, or None when it is a public unicast address."""
    addr = _parse_ip(ip)
    if isinstance(addr, ipaddress.IPv6Address):
        v4 = _embedded_v4(addr)
        if v4 is not None:
            reason = is_forbidden_ip(v4)
            if reason:
                return f"{reason} (embedded in {addr})"
            if addr.sixtofour is None:
                return None        # mapped/NAT64 of a public v4; the ::/8 "reserved" flag would misfire
    checks = [
        ("unspecified", addr.is_unspecified),
        ("loopback", addr.is_loopback),
        ("link-local", addr.is_link_local),            # includes 169.254.169.254 (cloud metadata)
        ("multicast", addr.is_multicast),
        ("carrier-grade NAT", isinstance(addr, ipaddress.IPv4Address) and addr in _CGNAT),
        ("private", addr.is_private),                  # includes fc00::/7 unique-local
        ("reserved", addr.is_reserved),
        ("site-local", isinstance(addr, ipaddress.IPv6Address) and addr.is_site_local),
        ("not globally routable", not addr.is_global),  # catch-all: documentation, benchmarking...
    ]
    for reason, hit in checks:
        if hit:
            return f"{reason} address {addr}"
    return None


def _is_localhost_name(host: str) -> bool:
    # RFC 6761: "localhost" and anything under it is loopback, whatever DNS says.
    host = host.lower().rstrip(".")
    return host == "localhost" or host.endswith(".localhost")


async def resolve(host: str, port: int) -> list[str]:
    """Every address the name resolves to (any one of them may be the one used)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({info[4][0] for info in infos})


async def check_url_allowed(url: str, allow_private: bool) -> None:
    """Raise RefusedAddress unless every address of the URL's host is public.

    Resolution failures propagate as OSError (socket.gaierror): that is a network
    error for the caller to retry, not a refusal.
    """
    if allow_private:
        return
    parts = urlsplit(url)
    host = parts.hostname
    if not host:
        raise RefusedAddress(f"no host in {url!r}")
    if _is_localhost_name(host):
        raise RefusedAddress(f"localhost name {host!r}")
    try:
        literal = _parse_ip(host)
    except ValueError:
        literal = None
    if literal is not None:
        reason = is_forbidden_ip(literal)
        if reason:
            raise RefusedAddress(reason)
        return
    port = parts.port or (443 if parts.scheme == "https" else 80)
    # Names like "2130706433" or "0x7f.1" are not literals to ipaddress but resolve to
    # 127.0.0.1 through inet_aton: resolving everything catches them too.
    for ip in await resolve(host, port):
        reason = is_forbidden_ip(ip)
        if reason:
            raise RefusedAddress(f"{host} resolves to {reason}")
