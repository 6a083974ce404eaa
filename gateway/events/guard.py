"""Where webhook deliveries may go: public addresses only, unless an operator allows others.

A receiver's URL is the customer's text, and the gateway sits inside a
network: without a guard a webhook is a way to make it call loopback services,
the private network or a cloud metadata endpoint (SSRF). The guard checks the
addresses a name resolves to at the moment of each connection (a resolver that
drops refused addresses), so a name that re-resolves to a private address
later (DNS rebinding) is refused then too; a literal address is checked before
any connection. Redirects are never followed (see the worker).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

__all__ = [
    "MAX_URL",
    "RECEIVER_URL_PATTERN",
    "GuardedResolver",
    "RefusedAddress",
    "check_url",
    "refused_address",
]

MAX_URL = 2048
# What a receiver's URL may be, said once: the admin API's schema publishes this very
# pattern, and check_url holds every URL to it (a name or IPv4 address, a port 1-65535).
_PORT = "([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
RECEIVER_URL_PATTERN = f"^https?://[A-Za-z0-9._-]+(:{_PORT})?([/?#][\\x21-\\x7e]*)?$"
RECEIVER_URL = re.compile(RECEIVER_URL_PATTERN)


class RefusedAddress(OSError):
    """The receiver's address is one deliveries may not go to (an OSError, so the HTTP
    client reports it as a connection that could not be made)."""


def refused_address(host: str) -> str | None:
    """Why a literal address may not receive deliveries; None when it may (or is a name)."""
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_global and not address.is_multicast:
        return None
    return f"{address} is not a public address (loopback, private, link-local or reserved)"


def check_url(url: str) -> str | None:
    """What is wrong with ``url`` as a receiver's address, before any lookup; None if nothing."""
    if len(url) > MAX_URL:
        return f"must be at most {MAX_URL} characters"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return f"is not a URL ({exc})"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an http:// or https:// URL with a host"
    if parts.username is not None or parts.password is not None:
        return "must not hold a user name or password"
    if parts.netloc.startswith("["):
        return "must name an IPv6 receiver by its host name, not a literal address"
    if port == 0 or RECEIVER_URL.fullmatch(url) is None:
        return (
            "must be http(s)://, a host name or IPv4 address, an optional port from 1 to "
            "65535, then a path of visible ASCII characters"
        )
    return None


class GuardedResolver(AbstractResolver):
    """The default resolver, minus every address deliveries may not go to."""

    def __init__(self, allow_private: bool) -> None:
        self._allow_private = allow_private
        self._resolver = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self._resolver.resolve(host, port, family)
        if self._allow_private:
            return found
        allowed = [r for r in found if refused_address(r["host"]) is None]
        if not allowed:
            raise RefusedAddress(f"{host} resolves only to addresses deliveries may not go to")
        return allowed

    async def close(self) -> None:
        await self._resolver.close()
