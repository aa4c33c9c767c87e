"""Where a webhook may go (SSRF): public addresses only, unless WEBHOOK_ALLOW_NETWORKS says.

An endpoint's URL is checked when it is added, and again at every delivery on the addresses
its name resolves to then: `VettingResolver` is the resolver of the sender's connector, so
aiohttp connects only to addresses that passed (no second lookup a DNS rebinding could
answer differently). Every address a name resolves to must pass, not only the first.

Refused unless in an allowed network: loopback, private (RFC 1918, ULA fc00::/7), link-local
(169.254/16, fe80::/10) and the cloud metadata addresses in them (169.254.169.254,
fd00:ec2::254), unspecified, multicast, CGNAT (100.64/10), reserved and documentation ranges:
every address Python's `ipaddress` does not call global. An IPv6 address carrying an IPv4 one
(IPv4-mapped ::ffff:a.b.c.d, NAT64 64:ff9b::/96, 6to4 2002::/16) is judged by that IPv4 one.

Plain http:// goes only to allowed networks (a receiver on the LAN, a test's on 127.0.0.1):
on the internet an integrator's endpoint is https, verified against the system's CAs.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult

IP = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
METADATA = frozenset({ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")})
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
MAX_URL_LENGTH = 2000


class AddressRefused(OSError, ValueError):
    """An endpoint whose address is not allowed; the text says which and why (one line).
    An OSError for aiohttp (a resolver's failure), a ValueError for whoever checks a URL."""


def plain(ip: IP) -> IP:
    """An IPv4 address carried in an IPv6 one, as the IPv4 address it is."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip in _NAT64:
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if ip.sixtofour is not None:
            return ip.sixtofour
    return ip


def kind(ip: IP) -> str | None:
    """Why an address is no place for a webhook (None: a public address)."""
    ip = plain(ip)
    if ip in METADATA:
        return "a cloud metadata address"
    checks = (("unspecified", ip.is_unspecified), ("loopback", ip.is_loopback),
              ("link-local", ip.is_link_local), ("multicast", ip.is_multicast),
              ("shared (CGNAT)", isinstance(ip, ipaddress.IPv4Address) and ip in _CGNAT),
              ("reserved", ip.is_reserved), ("private", ip.is_private))
    for name, hit in checks:
        if hit:
            return name
    return None if ip.is_global else "not a public address"


@dataclass(frozen=True)
class Policy:
    allowed: tuple[Network, ...] = ()

    @classmethod
    def of(cls, networks: Iterable[str]) -> Policy:
        return cls(tuple(ipaddress.ip_network(n, strict=False) for n in networks))

    def in_allowed(self, ip: IP) -> bool:
        return any(candidate in net for candidate in {ip, plain(ip)} for net in self.allowed
                   if candidate.version == net.version)

    def check(self, ip: IP, *, host: str, scheme: str = "https") -> None:
        """Raise AddressRefused unless a webhook may go to `ip` (what `host` names)."""
        if self.in_allowed(ip):
            return
        why = kind(ip)
        shown = host if host == str(ip) else f"{host} ({ip})"
        if why is not None:
            raise AddressRefused(f"{shown} is {why}: refused (WEBHOOK_ALLOW_NETWORKS may allow it)")
        if scheme != "https":
            raise AddressRefused(f"{shown}: plain http goes only to WEBHOOK_ALLOW_NETWORKS;"
                                 " use https")


Lookup = Callable[[str, int], Awaitable[Sequence[str]]]


async def system_lookup(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]).partition("%")[0] for info in infos]


def literal(host: str) -> IP | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def parse(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an endpoint URL, or ValueError saying what is wrong."""
    if len(url) > MAX_URL_LENGTH:
        raise ValueError(f"the URL is longer than {MAX_URL_LENGTH} characters")
    if any(ch.isspace() or not ch.isprintable() for ch in url):
        raise ValueError("the URL holds spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"not a URL: {exc}") from None
    if parts.scheme not in ("https", "http"):
        raise ValueError("an endpoint URL is https:// (or http:// to an allowed network)")
    if not parts.hostname:
        raise ValueError("the URL has no host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("the URL holds credentials: authenticate receivers by the signature")
    if parts.fragment:
        raise ValueError("the URL has a #fragment, which is never sent")
    return parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80)


async def vet_url(url: str, policy: Policy, lookup: Lookup = system_lookup) -> list[str]:
    """Check an endpoint URL and every address its host resolves to now (when it is added);
    returns the addresses. Raises ValueError (AddressRefused for an address)."""
    scheme, host, port = parse(url)
    ip = literal(host)
    if ip is not None:
        policy.check(ip, host=host, scheme=scheme)
        return [str(ip)]
    try:
        addresses = list(await lookup(host, port))
    except OSError as exc:
        raise AddressRefused(f"{host} does not resolve ({exc.strerror or exc})") from None
    if not addresses:
        raise AddressRefused(f"{host} does not resolve")
    for address in addresses:
        policy.check(ipaddress.ip_address(address), host=host, scheme=scheme)
    return addresses


class VettingResolver(AbstractResolver):
    """The sender connector's resolver: it resolves (with `lookup`), checks every address
    and hands aiohttp only the addresses checked, or refuses the connection."""

    def __init__(self, policy: Policy, scheme: str, lookup: Lookup = system_lookup) -> None:
        self.policy, self.scheme, self.lookup = policy, scheme, lookup

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        addresses = list(await self.lookup(host, port))
        if not addresses:
            raise AddressRefused(f"{host} does not resolve")
        results: list[ResolveResult] = []
        for address in addresses:
            ip = ipaddress.ip_address(address)
            self.policy.check(ip, host=host, scheme=self.scheme)  # every one, or none
            results.append(ResolveResult(
                hostname=host, host=str(ip), port=port,
                family=socket.AF_INET6 if ip.version == 6 else socket.AF_INET,
                proto=0, flags=socket.AI_NUMERICHOST))
        return results

    async def close(self) -> None:
        return None
