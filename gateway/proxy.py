"""Forwarding: upstream clients, header hygiene and client-address trust.

The upstream clients keep no cookies, follow no redirects and decompress
nothing: bytes pass through as they are.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.config import IdentityHeaderSettings, UpstreamSettings

__all__ = [
    "ClientAddress",
    "Upstream",
    "UpstreamPool",
    "request_headers",
    "response_headers",
]

# RFC 9110 §7.6.1, plus the old Proxy-Connection; Host and Content-Length are
# set by the client library, Expect is answered by the gateway itself.
HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Connection",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
    )
)
_NOT_FORWARDED = HOP_BY_HOP | {"host", "authorization", "expect", "content-length"}
_NOT_RETURNED = HOP_BY_HOP | {"x-gateway-charge", "content-length"}
CHARGE_HEADER = "X-Gateway-Charge"


def _connection_listed(headers: CIMultiDictProxy[str]) -> set[str]:
    """Header names a Connection header declares hop-by-hop."""
    listed: set[str] = set()
    for value in headers.getall("Connection", ()):
        listed.update(t.strip().lower() for t in value.split(",") if t.strip())
    return listed


class Upstream:
    """One named upstream: its base URL and its own client session."""

    def __init__(self, name: str, settings: UpstreamSettings) -> None:
        self.name = name
        self.settings = settings
        self.base_url = settings.url
        self.extra_headers = {k: v.get_secret_value() for k, v in settings.headers.items()}
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            s = self.settings
            connector = aiohttp.TCPConnector(
                limit=s.max_connections,
                limit_per_host=s.max_connections,
                # Close idle connections before the upstream does, so a request
                # is never written into a socket the upstream is closing.
                keepalive_timeout=s.keepalive_seconds,
                ttl_dns_cache=60,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    sock_connect=s.connect_timeout_seconds,
                    sock_read=s.read_timeout_seconds,
                ),
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
                raise_for_status=False,
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class UpstreamPool:
    def __init__(self, upstreams: Mapping[str, UpstreamSettings]) -> None:
        self._upstreams = {name: Upstream(name, s) for name, s in upstreams.items()}

    def __getitem__(self, name: str) -> Upstream:
        return self._upstreams[name]

    async def close(self) -> None:
        for upstream in self._upstreams.values():
            await upstream.close()


class ClientAddress:
    """Decides which client address the gateway can vouch for."""

    def __init__(self, trusted: Iterable[str]) -> None:
        self._networks = tuple(ipaddress.ip_network(t, strict=False) for t in trusted)

    def trusts(self, peer: str | None) -> bool:
        if not self._networks or not peer:
            return False
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(address in network for network in self._networks)

    def client_ip(self, peer: str | None, forwarded_for: str | None) -> str:
        """The peer, or the nearest untrusted hop of X-Forwarded-For behind trusted proxies."""
        if not forwarded_for or not self.trusts(peer):
            return peer or ""
        hops = [h.strip() for h in forwarded_for.split(",") if h.strip()]
        for hop in reversed(hops):
            if not self.trusts(hop):
                return hop
        return hops[0] if hops else (peer or "")


def request_headers(
    incoming: CIMultiDictProxy[str],
    *,
    identity: IdentityHeaderSettings,
    identity_values: Mapping[str, str],
    extra: Mapping[str, str],
    peer: str,
    trusted: bool,
    scheme: str,
    request_id: str,
) -> CIMultiDict[str]:
    """Headers for the upstream request."""
    drop = _NOT_FORWARDED | _connection_listed(incoming)
    prefix = identity.prefix.lower()
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in incoming.items():
        lower = name.lower()
        if lower in drop or lower.startswith(prefix) or lower.startswith("x-forwarded-"):
            continue
        if lower == "forwarded" and not trusted:
            continue
        if lower == "x-request-id":
            continue
        out.add(name, value)
    if "Content-Length" in incoming:
        out["Content-Length"] = incoming["Content-Length"]
    prior = incoming.get("X-Forwarded-For") if trusted else None
    out["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
    out["X-Forwarded-Proto"] = (incoming.get("X-Forwarded-Proto") if trusted else None) or scheme
    host = (incoming.get("X-Forwarded-Host") if trusted else None) or incoming.get("Host")
    if host:
        out["X-Forwarded-Host"] = host
    out["X-Request-Id"] = request_id
    for name, value in identity_values.items():
        out[name] = value
    for name, value in extra.items():
        out[name] = value
    return out


def response_headers(incoming: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """Headers for the client: hop-by-hop and the charge header removed."""
    drop = _NOT_RETURNED | _connection_listed(incoming)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in incoming.items():
        if name.lower() not in drop:
            out.add(name, value)
    return out
