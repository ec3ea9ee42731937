"""Where a webhook may point: public addresses only, unless the operator allows more.

A webhook makes the service send signed POSTs to a URL a member chose; pointed at
loopback, the private network or the cloud metadata address, that is a request
forgery from inside the service's network. So a target is refused when ANY address
its host resolves to is loopback, private, link-local, multicast, unspecified,
reserved or otherwise not globally routable (IPv4-mapped and NAT64/6to4 forms
judged by the IPv4 address inside), unless it lies in one of the CIDRs of
`SANDBOXER_WEBHOOK_ALLOW_NETS`. The check runs at registration and again at each
delivery; the delivery's HTTP client resolves through `PolicyResolver`, which applies
the same check to the addresses it then connects to, so re-pointing a name between
the check and the connection does not get past it.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
from collections.abc import Mapping, Sequence
from urllib.parse import urlparse

from aiohttp.abc import AbstractResolver, ResolveResult

from sandboxer.app.webhook_settings import ALLOW_VARIABLE, IPNetwork, parse_allow_nets
from sandboxer.errors import InvalidInput

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
SHOWN_URL = 80  # at most this much of a url goes into an error message


class TargetRefused(InvalidInput):
    """The url's host is, or resolves to, an address webhooks may not reach."""

    code = "invalid_body"
    field = "url"


def _embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (mapped, NAT64, 6to4), if any."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.sixtofour


def address_class(ip: IPAddress) -> str | None:
    """Why webhooks may not reach `ip` ("loopback", "private", ...); None: public."""
    inner = _embedded_ipv4(ip)
    if inner is not None:
        why = address_class(inner)
        return f"{why} (IPv4 {inner} inside {ip})" if why else None
    for name, refused in (
        ("loopback", ip.is_loopback),
        ("unspecified", ip.is_unspecified),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("private", ip.is_private),
        ("reserved", ip.is_reserved),
        ("site-local", isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local),
        ("not globally routable", not ip.is_global),
    ):
        if refused:
            return name
    return None


def literal_address(host: str) -> IPAddress | None:
    """The address a host names without DNS: dotted, IPv6, and the legacy numeric
    IPv4 forms (`2130706433`, `0x7f.1`, `127.1`) that inet_aton and resolvers accept."""
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


class TargetPolicy:
    def __init__(self, allow: Sequence[IPNetwork] = (), resolve_timeout: float = 5.0) -> None:
        self.allow = tuple(allow)
        self.resolve_timeout = resolve_timeout

    @classmethod
    def from_env(cls, environ: Mapping[str, str], resolve_timeout: float = 5.0) -> TargetPolicy:
        return cls(parse_allow_nets(environ), resolve_timeout)

    def check_address(self, ip: IPAddress) -> None:
        why = address_class(ip)
        if why is None or self.allowed(ip):
            return
        raise TargetRefused(
            f"url resolves to {ip} ({why} address): webhooks may only target public "
            f"addresses (an operator can allow networks with {ALLOW_VARIABLE})"
        )

    def allowed(self, ip: IPAddress) -> bool:
        """Inside an operator's CIDR (an IPv4-mapped address counts as its IPv4)."""
        inner = _embedded_ipv4(ip)
        return any(
            candidate.version == net.version and candidate in net
            for candidate in (ip, inner)
            if candidate is not None
            for net in self.allow
        )

    async def resolve(self, host: str, port: int) -> list[tuple[socket.AddressFamily, str]]:
        """Every address of `host`, each checked: (family, address) to connect to."""
        literal = literal_address(host)
        if literal is not None:
            self.check_address(literal)
            if literal.version == 4 and str(literal) != host:  # aiohttp would refuse it too
                raise TargetRefused(f"write the url's host as {literal}, not {host[:40]!r}")
            family = socket.AF_INET if literal.version == 4 else socket.AF_INET6
            return [(family, host)]
        try:
            async with asyncio.timeout(self.resolve_timeout):
                infos = await asyncio.get_running_loop().getaddrinfo(
                    host, port, type=socket.SOCK_STREAM
                )
        except TimeoutError:
            raise TargetRefused(f"url host {host[:80]!r} did not resolve in time") from None
        except OSError as exc:  # socket.gaierror: no such name, no DNS
            raise TargetRefused(f"url host {host[:80]!r} does not resolve: {exc}") from None
        found: list[tuple[socket.AddressFamily, str]] = []
        for family, _, _, _, sockaddr in infos:
            address = str(sockaddr[0])
            self.check_address(ipaddress.ip_address(address.split("%", 1)[0]))
            if (family, address) not in found:
                found.append((family, address))
        if not found:
            raise TargetRefused(f"url host {host[:80]!r} has no address")
        return found

    async def check_url(self, url: str) -> None:
        """Refuse a url whose host is, or resolves to, an address not allowed."""
        parsed = urlparse(url)
        host = parsed.hostname
        if not host:
            raise TargetRefused(f"url has no host: {url[:SHOWN_URL]!r}")
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        await self.resolve(host, port)


class PolicyResolver(AbstractResolver):
    """aiohttp resolver that answers only with addresses the policy allows, so the
    connection goes to an address that was checked (not to a later DNS answer)."""

    def __init__(self, policy: TargetPolicy) -> None:
        self.policy = policy

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        try:
            found = await self.policy.resolve(host, port)
        except TargetRefused as exc:
            # aiohttp turns it into a connector error that shows the strerror.
            raise OSError(errno.EACCES, str(exc)) from None
        results = [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=fam,
                proto=0,
                flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
            )
            for fam, address in found
            if family == socket.AF_UNSPEC or fam == family
        ]
        if not results:
            raise OSError(f"{host[:80]!r} has no address of the family asked for")
        return results

    async def close(self) -> None:
        pass
