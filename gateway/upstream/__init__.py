"""The connection layer to upstreams: keep-alive pools, request framing, answers parsed by llhttp.

Why not a library client: measured here (issue 18), aiohttp's ClientSession held one gateway
process to 5,900 req/s at 166 ms CPU per 1,000 requests; asyncio protocols with httptools
(llhttp) did 12,900 req/s at 66 ms, and half the ClientSession's samples were its own overhead.

The forward stage sees one interface, :class:`UpstreamClient`, whose ``request`` returns an
:class:`UpstreamAnswer`; :func:`open_client` picks the implementation an upstream's config
names (``client: lean``, the default, or ``client: aiohttp``, the documented fallback).
"""

from __future__ import annotations

from gateway.config import UpstreamSettings
from gateway.upstream.answer import (
    Body,
    InvalidAnswer,
    UpstreamAnswer,
    UpstreamClient,
    UpstreamError,
)
from gateway.upstream.client import LeanClient
from gateway.upstream.fallback import AiohttpClient

__all__ = [
    "AiohttpClient",
    "Body",
    "InvalidAnswer",
    "LeanClient",
    "UpstreamAnswer",
    "UpstreamClient",
    "UpstreamError",
    "open_client",
]


def open_client(settings: UpstreamSettings) -> UpstreamClient:
    """The client an upstream's settings ask for; no connection is opened yet."""
    if settings.client == "aiohttp":
        return AiohttpClient(settings)
    return LeanClient(settings)
