"""Which addresses goldclone may connect to when it fetches an image or calls a callback URL.

Clients hand goldclone URLs, so without a policy they could make it reach the cloud metadata
service or the host's own services (server-side request forgery). ``PolicyTransport`` resolves
each request's host name once, checks every address it resolves to, and then connects to the
checked address itself (keeping the name for the Host header and TLS), so a DNS answer that
changes between check and connect cannot slip through. httpx hands each redirect hop to the
transport again, so every hop is checked.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx

from goldclone.errors import URLForbidden

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[IPAddress]]]

# Link-local (and so every cloud's metadata address), AWS's IPv6 metadata address, and
# addresses that are no real destination.
_ALWAYS_DENIED = [
    ipaddress.ip_network(net)
    for net in ("169.254.0.0/16", "fe80::/10", "fd00:ec2::254/128", "0.0.0.0/8", "::/128")
]


@dataclass(frozen=True)
class OutboundPolicy:
    """``allow_private`` allows every address that is not global: loopback and the private
    ranges (RFC 1918, unique local, CGNAT and the like)."""

    allow_private: bool = True

    def check(self, address: IPAddress, url: str) -> None:
        """Raise ``URLForbidden`` unless connecting to ``address`` (for ``url``) is allowed."""
        plain = _unmapped(address)
        denied = any(plain in net for net in _ALWAYS_DENIED) or plain.is_multicast
        if not denied and not self.allow_private:
            denied = not plain.is_global
        if denied:
            raise URLForbidden(f"{url}: connecting to {plain} is not allowed on this server")

    def check_literal(self, url: str) -> None:
        """Check a URL whose host is an IP address at once; names are checked on connect."""
        try:
            address = ipaddress.ip_address(httpx.URL(url).host)
        except (ValueError, httpx.InvalidURL):
            return
        self.check(address, url)


def _unmapped(address: IPAddress) -> IPAddress:
    """``::ffff:169.254.169.254`` and the like, as the IPv4 address they stand for."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


async def system_resolver(host: str, port: int) -> list[IPAddress]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses: list[IPAddress] = []
    for *_, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%")[0])
        if address not in addresses:
            addresses.append(address)
    return addresses


class PolicyTransport(httpx.AsyncBaseTransport):
    """An httpx transport that connects only to addresses ``policy`` allows."""

    def __init__(
        self,
        policy: OutboundPolicy,
        inner: httpx.AsyncBaseTransport | None = None,
        resolver: Resolver = system_resolver,
    ) -> None:
        self._policy = policy
        self._inner = inner or httpx.AsyncHTTPTransport()
        self._resolve = resolver

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url, host = str(request.url), request.url.host
        port = request.url.port or (443 if request.url.scheme == "https" else 80)
        try:
            addresses = await self._resolve(host, port)
        except (OSError, UnicodeError) as exc:  # UnicodeError: a label IDNA can't encode
            raise httpx.ConnectError(f"cannot resolve {host}: {exc}", request=request) from exc
        if not addresses:
            raise httpx.ConnectError(f"{host} has no address", request=request)
        for address in addresses:
            self._policy.check(address, url)
        request.url = request.url.copy_with(host=str(addresses[0]))
        request.extensions = {**request.extensions, "sni_hostname": host}
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()
