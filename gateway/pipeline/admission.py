"""Admission: path hygiene, route match, method, protocol upgrades and declared body size.

Everything here is decided from the request line and headers, before the
gateway spends anything on the request (no key lookup, no limit, no credit).
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from gateway import errors
from gateway.errors import Refusal
from gateway.models import Outcome
from gateway.pipeline.exchange import Exchange
from gateway.routing import BadPath, Route, Router, checked_path

__all__ = ["Admission", "Admitted", "check_declared_size"]

_CREDITS_PATHS = frozenset({"/api/v1/credits", "/api/v1/credits/"})
BALANCE_LABEL = "/api/v1/credits"


@dataclass(frozen=True, slots=True)
class Admitted:
    """Where an admitted request goes: a route, or (``route`` None) the balance endpoint."""

    route: Route | None
    path: str  # decoded, as matched
    encoded_path: str  # as forwarded
    query: str


class Admission:
    def __init__(self, router: Router) -> None:
        self._router = router

    def admit(self, request: web.BaseRequest, ex: Exchange) -> Admitted:
        """The request's route, or a :class:`Refusal` (400, 404, 405, 417, 501)."""
        try:
            raw_path, _, query = request.raw_path.partition("?")
            path, encoded_path = checked_path(raw_path)
        except BadPath as exc:
            raise errors.refuse_bad_request(str(exc)) from None
        if path in _CREDITS_PATHS:
            ex.route = BALANCE_LABEL
            if request.method not in ("GET", "HEAD"):
                raise errors.refuse_method({"GET", "HEAD"})
            return Admitted(None, path, encoded_path, query)
        match = self._router.match(request.method, path)
        route = match.route
        if route is None:
            if match.allowed:
                raise errors.refuse_method(match.allowed)
            raise errors.refuse_not_found()
        ex.route = route.label
        headers = request.headers
        if "Upgrade" in headers:
            raise Refusal(501, "Protocol upgrades are not supported", Outcome.BAD_REQUEST)
        expect = headers.get("Expect")
        if expect is not None and expect.lower() != "100-continue":
            raise Refusal(417, f"Unsupported Expect value: {expect[:64]}", Outcome.BAD_REQUEST)
        return Admitted(route, path, encoded_path, query)


def check_declared_size(request: web.BaseRequest, route: Route) -> None:
    """Refuse a body whose declared length is over the route's limit (413)."""
    declared = request.content_length
    if declared is not None and declared > route.max_body_bytes:
        raise errors.refuse_too_large(route.max_body_bytes)
