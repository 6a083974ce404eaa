"""Forwarding: the named upstreams, header hygiene and client-address trust.

The upstream clients (gateway/upstream/) keep no cookies, follow no redirects
and decompress nothing: bytes pass through as they are.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping

from multidict import CIMultiDict, CIMultiDictProxy

from gateway.config import IdentityHeaderSettings, UpstreamSettings
from gateway.upstream import UpstreamClient, open_client

__all__ = [
    "ClientAddress",
    "HeaderPolicy",
    "MalformedAnswer",
    "Upstream",
    "UpstreamPool",
    "upstream_target",
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

# What an HTTP/1.1 server must not write in a status line or a header (RFC 9110
# §5.5: no control characters but tab), and lone surrogates: bytes that were
# not UTF-8 upstream, which cannot be written back as they came.
_UNWRITABLE = re.compile("[\x00-\x08\x0a-\x1f\x7f\ud800-\udfff]")


class MalformedAnswer(ValueError):
    """An upstream answer the gateway cannot relay as it is (the client gets a 502)."""


def writable(text: str) -> bool:
    """Whether ``text`` can go out in a status line or a header field unchanged."""
    return (text.isascii() and text.isprintable()) or _UNWRITABLE.search(text) is None


# What nearly every Connection header says; neither names another header.
_PLAIN_CONNECTION = frozenset({"keep-alive", "close", "Keep-Alive", "Close"})


def _connection_listed(headers: CIMultiDictProxy[str]) -> set[str]:
    """Header names a Connection header declares hop-by-hop."""
    listed: set[str] = set()
    values = headers.getall("Connection", ())
    if len(values) == 1 and values[0] in _PLAIN_CONNECTION:
        return listed
    for value in values:
        listed.update(t.strip().lower() for t in value.split(",") if t.strip())
    return listed


def upstream_target(encoded_path: str, raw_query: str) -> str:
    """The request target (origin-form) from parts already validated and encoded."""
    return f"{encoded_path}?{raw_query}" if raw_query else encoded_path


class Upstream:
    """One named upstream: its settings and its own client (and so its own connections)."""

    def __init__(self, name: str, settings: UpstreamSettings) -> None:
        self.name = name
        self.settings = settings
        self.base_url = settings.url
        self.extra_headers = {k: v.get_secret_value() for k, v in settings.headers.items()}
        self.client: UpstreamClient = open_client(settings)

    async def close(self) -> None:
        await self.client.close()


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


# Header names seen so far and what to do with each: deciding costs a lower()
# and several set lookups, and the same few names come with every request.
# Bounded, so that a client inventing names cannot grow it without end.
_VERDICT_CACHE_SIZE = 4096
_DROP, _KEEP, _IF_TRUSTED = 0, 1, 2


class HeaderPolicy:
    """Which client headers go upstream and which upstream headers go back."""

    def __init__(self, identity: IdentityHeaderSettings) -> None:
        self._identity_prefix = identity.prefix.lower()
        self._inbound: dict[str, int] = {}
        self._outbound: dict[str, bool] = {}

    def _inbound_verdict(self, name: str) -> int:
        verdict = self._inbound.get(name)
        if verdict is not None:
            return verdict
        lower = name.lower()
        if (
            lower in _NOT_FORWARDED
            or lower.startswith(self._identity_prefix)
            or lower.startswith("x-forwarded-")
            or lower == "x-request-id"
        ):
            verdict = _DROP
        elif lower == "forwarded":
            verdict = _IF_TRUSTED
        else:
            verdict = _KEEP
        if len(self._inbound) < _VERDICT_CACHE_SIZE:
            self._inbound[name] = verdict
        return verdict

    def upstream(
        self,
        incoming: CIMultiDictProxy[str],
        *,
        identity_values: Mapping[str, str],
        extra: Mapping[str, str],
        peer: str,
        trusted: bool,
        scheme: str,
        request_id: str,
    ) -> CIMultiDict[str]:
        """Headers for the upstream request."""
        listed = _connection_listed(incoming) if "Connection" in incoming else None
        out: CIMultiDict[str] = CIMultiDict()
        for name, value in incoming.items():
            verdict = self._inbound_verdict(name)
            if verdict == _DROP or (verdict == _IF_TRUSTED and not trusted):
                continue
            if listed and name.lower() in listed:
                continue
            out.add(name, value)
        length = incoming.get("Content-Length")
        if length is not None:
            out["Content-Length"] = length
        prior = incoming.get("X-Forwarded-For") if trusted else None
        out["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
        out["X-Forwarded-Proto"] = (
            incoming.get("X-Forwarded-Proto") if trusted else None
        ) or scheme
        host = (incoming.get("X-Forwarded-Host") if trusted else None) or incoming.get("Host")
        if host:
            out["X-Forwarded-Host"] = host
        out["X-Request-Id"] = request_id
        for name, value in identity_values.items():
            out[name] = value
        for name, value in extra.items():
            out[name] = value
        return out

    def client(self, incoming: CIMultiDictProxy[str]) -> CIMultiDict[str]:
        """Headers for the client: hop-by-hop and the charge header removed.

        Raises :class:`MalformedAnswer` for a header the server could not write.
        """
        listed = _connection_listed(incoming) if "Connection" in incoming else None
        out: CIMultiDict[str] = CIMultiDict()
        cache = self._outbound
        for name, value in incoming.items():
            keep = cache.get(name)
            if keep is None:
                if not writable(name):
                    raise MalformedAnswer("a header name the gateway cannot relay")
                keep = name.lower() not in _NOT_RETURNED
                if len(cache) < _VERDICT_CACHE_SIZE:
                    cache[name] = keep
            if keep and not (listed and name.lower() in listed):
                if not writable(value):
                    raise MalformedAnswer(f"a control character in the {name} header")
                out.add(name, value)
        return out
