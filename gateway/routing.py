"""Route table: path validation and whole-segment prefix matching.

Matching happens on the decoded path, and the path forwarded upstream is that
same decoded path re-encoded canonically, so what the upstream sees is exactly
what was matched: ``/api/v1/%61ssess`` cannot slip past a charged route under
a free route's prefix.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from urllib.parse import quote, unquote

from gateway.config import RouteSettings, Settings

__all__ = ["BadPath", "Match", "Route", "Router", "canonical_path", "checked_path", "encode_path"]

_ENCODED_SEPARATOR = re.compile(r"%(2[fF]|5[cC])")
_SAFE_PATH_CHARS = "/:@!$&'()*+,;=-._~"
_CONTROL = re.compile("[\x00-\x1f\x7f]")


class BadPath(ValueError):
    """A path the gateway refuses to interpret (400)."""


@dataclass(frozen=True, slots=True)
class Route:
    path: str
    methods: frozenset[str]
    upstream: str
    test_upstream: str | None
    cost: int
    auth: bool
    max_body_bytes: int
    max_duration_seconds: float
    refund_statuses: frozenset[int]
    label: str

    @classmethod
    def from_settings(cls, s: RouteSettings) -> Route:
        refund: set[int] = set()
        for item in s.refund_on:
            if item.endswith("xx"):
                base = int(item[0]) * 100
                refund.update(range(base, base + 100))
            else:
                refund.add(int(item))
        methods = set(s.methods)
        if "GET" in methods:
            methods.add("HEAD")
        return cls(
            path=s.path,
            methods=frozenset(methods),
            upstream=s.upstream,
            test_upstream=s.test_upstream,
            cost=s.cost,
            auth=s.auth,
            max_body_bytes=s.max_body_bytes,
            max_duration_seconds=s.max_duration_seconds,
            refund_statuses=frozenset(refund),
            label=s.path,
        )

    def charges(self, method: str) -> int:
        """The credits a request costs: HEAD and OPTIONS never pay."""
        if not self.auth or method in ("HEAD", "OPTIONS"):
            return 0
        return self.cost


@dataclass(frozen=True, slots=True)
class Match:
    route: Route | None
    allowed: frozenset[str]  # methods the path accepts, for 405's Allow header
    path: str  # the decoded path that was matched


def canonical_path(raw_path: str) -> str:
    """Validate a raw request path and return it decoded.

    Refused: anything not starting with ``/``, encoded ``/`` or ``\\``, a
    backslash, ``.``/``..`` segments (also encoded), empty segments (one
    trailing slash is allowed), and control characters.
    """
    if not raw_path.startswith("/"):
        raise BadPath("the request target must be a path starting with '/'")
    if "\\" in raw_path or _ENCODED_SEPARATOR.search(raw_path):
        raise BadPath("encoded slashes and backslashes are not allowed in the path")
    try:
        decoded = unquote(raw_path, errors="strict")
    except UnicodeDecodeError:
        raise BadPath("the path is not valid UTF-8 once decoded") from None
    if _CONTROL.search(decoded):
        raise BadPath("control characters are not allowed in the path")
    body = decoded[1:-1] if decoded.endswith("/") and len(decoded) > 1 else decoded[1:]
    if body:
        for segment in body.split("/"):
            if segment in ("", ".", ".."):
                raise BadPath("empty, '.' and '..' path segments are not allowed")
    return decoded


def encode_path(decoded: str) -> str:
    """The canonical encoded form of an already validated, decoded path."""
    return quote(decoded, safe=_SAFE_PATH_CHARS)


@functools.lru_cache(maxsize=4096)
def checked_path(raw_path: str) -> tuple[str, str]:
    """``raw_path`` decoded and re-encoded canonically; raises :class:`BadPath`.

    Decoding, checking and quoting again cost more than all the rest of the
    routing, and a gateway sees the same few paths over and over: the answers
    are kept (bounded; a refused path is never kept).
    """
    decoded = canonical_path(raw_path)
    return decoded, encode_path(decoded)


class Router:
    """Longest whole-segment prefix wins; the method picks among that prefix's routes."""

    def __init__(self, settings: Settings) -> None:
        table: dict[str, dict[str, Route]] = {}
        for route_settings in settings.routes:
            route = Route.from_settings(route_settings)
            by_method = table.setdefault(route.path, {})
            for method in route.methods:
                by_method.setdefault(method, route)
        self._table = table

    def match(self, method: str, path: str) -> Match:
        """Match a decoded, validated path."""
        table = self._table
        candidate = path.rstrip("/") or "/"
        while True:
            by_method = table.get(candidate)
            if by_method is not None:
                route = by_method.get(method)
                return Match(route, frozenset(by_method), path)
            if candidate == "/":
                return Match(None, frozenset(), path)
            candidate = candidate.rsplit("/", 1)[0] or "/"

    @property
    def routes(self) -> list[Route]:
        seen: dict[int, Route] = {}
        for by_method in self._table.values():
            for route in by_method.values():
                seen[id(route)] = route
        return list(seen.values())
