"""Signing in and out, the start page, the operators' team list, and the static files."""

from __future__ import annotations

import hmac
import logging
import secrets
import time
from urllib.parse import urlencode

from aiohttp import web

from gateway.app import GATEWAY, Gateway
from gateway.console._checks import client_ip, over_tls, read_form, same_origin
from gateway.console._html import Markup, fmt, join
from gateway.console._layout import error_page, page, redirect, team_url, when
from gateway.console._state import (
    PREFIX,
    SESSION,
    SESSION_COOKIE,
    SESSIONS,
    SIGNIN_COOKIE,
    STATIC,
    TEMPLATES,
    session_of,
)
from gateway.manage import Actor

__all__ = ["authenticate", "go", "index", "sign_in", "sign_in_form", "sign_out", "static", "teams"]

log = logging.getLogger("gateway.console")
SIGNIN_SECONDS = 3600
MAX_TOKEN_LENGTH = 512
TEAMS_PER_PAGE = 50
# Wrong tokens one client address may try per window before sign-in is refused for a while.
MAX_FAILURES = 10
FAILURE_WINDOW = 300.0


async def authenticate(gateway: Gateway, presented: str) -> tuple[Actor, str] | None:
    """The check the admin API makes on ``Authorization: Bearer`` (the service's),
    and how the console's header names who signed in."""
    found = await gateway.management.authenticate(presented)
    if found is None:
        return None
    actor, token = found
    if token is None:
        return actor, "Operator (admin token)"
    team = await gateway.management.team(token.team_id)
    return actor, f"{team.name} (token {token.prefix}…)"


class FailureThrottle:
    """Counts refused sign-ins per client address in fixed windows (bounded memory)."""

    def __init__(self, limit: int = MAX_FAILURES, window: float = FAILURE_WINDOW) -> None:
        self._limit = limit
        self._window = window
        self._counts: dict[str, tuple[float, int]] = {}

    def blocked(self, address: str, now: float) -> bool:
        started, count = self._counts.get(address, (now, 0))
        return now - started < self._window and count >= self._limit

    def failed(self, address: str, now: float) -> None:
        started, count = self._counts.get(address, (now, 0))
        if now - started >= self._window:
            started, count = now, 0
        if len(self._counts) >= 10_000 and address not in self._counts:
            self._counts = {a: v for a, v in self._counts.items() if now - v[0] < self._window}
            if len(self._counts) >= 10_000:
                return
        self._counts[address] = (started, count + 1)


THROTTLE = web.AppKey("console_throttle", FailureThrottle)


def _cookie(
    request: web.Request, response: web.StreamResponse, name: str, value: str, max_age: int
) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path=PREFIX,
        httponly=True,
        samesite="Strict",
        secure=True if over_tls(request) else None,  # over plain HTTP it would never come back
    )


async def _form(
    request: web.Request, status: int = 200, message: str | None = None
) -> web.Response:
    nonce = secrets.token_urlsafe(24)
    error = message is not None
    body = request.app[TEMPLATES].render(
        "sign_in",
        action=f"{PREFIX}/sign-in",
        nonce=nonce,
        token_invalid=Markup(' aria-invalid="true" aria-describedby="token-error"')
        if error
        else Markup(""),
        token_error=fmt('<p class="field-error" id="token-error" role="alert">$m</p>', m=message)
        if error
        else Markup(""),
    )
    response = await page(request, title="Sign in", body=body, status=status)
    _cookie(request, response, SIGNIN_COOKIE, nonce, SIGNIN_SECONDS)
    return response


def _home(actor: Actor) -> str:
    if actor.is_admin:
        return f"{PREFIX}/teams"
    assert actor.team_id is not None
    return team_url(actor.team_id)


async def index(request: web.Request) -> web.Response:
    return redirect(_home(session_of(request).actor))


async def sign_in_form(request: web.Request) -> web.Response:
    session = request.get(SESSION)
    if session is not None:
        return redirect(_home(session.actor))
    return await _form(request)


async def sign_in(request: web.Request) -> web.Response:
    form = await read_form(request)
    nonce, token = form.get("nonce"), form.get("token")
    expected = request.cookies.get(SIGNIN_COOKIE, "")
    if (
        not same_origin(request)
        or not isinstance(nonce, str)
        or not expected
        or not hmac.compare_digest(nonce.encode(), expected.encode())
    ):
        return await _form(request, 403, "The sign-in form expired. Please enter the token again.")
    address = client_ip(request)
    throttle = request.app[THROTTLE]
    now = time.monotonic()
    if throttle.blocked(address, now):
        return await _form(request, 429, "Too many wrong tokens. Wait a few minutes.")
    found = None
    if isinstance(token, str) and len(token) <= MAX_TOKEN_LENGTH:
        found = await authenticate(request.app[GATEWAY], token)
    if found is None:
        throttle.failed(address, now)
        log.warning("console: sign-in refused", extra={"fields": {"client_ip": address}})
        return await _form(request, 403, "That token was not accepted.")
    actor, who = found
    sessions = request.app[SESSIONS]
    # A fresh id at every sign-in: a session id planted before it is worth nothing.
    sessions.delete(request.cookies.get(SESSION_COOKIE))
    session_id, _ = sessions.create(actor, who)
    log.info("console: signed in", extra={"fields": {"actor": actor.label, "client_ip": address}})
    response = redirect(_home(actor))
    _cookie(request, response, SESSION_COOKIE, session_id, int(sessions.lifetime))
    response.del_cookie(SIGNIN_COOKIE, path=PREFIX)
    return response


async def sign_out(request: web.Request) -> web.Response:
    request.app[SESSIONS].delete(request.cookies.get(SESSION_COOKIE))
    response = redirect(f"{PREFIX}/sign-in")
    response.del_cookie(SESSION_COOKIE, path=PREFIX)
    return response


async def teams(request: web.Request) -> web.Response:
    actor = session_of(request).actor
    if not actor.is_admin:
        return redirect(_home(actor))
    after = request.query.get("after") or None
    found = await request.app[GATEWAY].management.teams(TEAMS_PER_PAGE, after, actor=actor)
    rows = join(
        fmt(
            '<tr><th scope="row"><a href="$keys">$name</a></th><td><code>$id</code></td>'
            '<td>$created</td><td class="links"><a href="$keys">Keys</a> '
            '<a href="$credits">Credits</a> <a href="$usage">Usage</a></td></tr>',
            name=t.name,
            id=t.id,
            created=when(t.created_at),
            keys=team_url(t.id, "keys"),
            credits=team_url(t.id, "credits"),
            usage=team_url(t.id, "usage"),
        )
        for t in found
    )
    if not found:
        rows = Markup(
            '<tr><td colspan="4">No teams yet (create one with the admin API or '
            "<code>gateway teams create</code>).</td></tr>"
        )
    pager = Markup("")
    if len(found) == TEAMS_PER_PAGE:
        pager = fmt(
            '<p class="pager"><a href="$href">Next teams →</a></p>',
            href=f"{PREFIX}/teams?" + urlencode({"after": found[-1].id}),
        )
    body = request.app[TEMPLATES].render("teams", rows=rows, pager=pager)
    return await page(request, title="Teams", body=body)


async def go(request: web.Request) -> web.Response:
    """The team picker's target: open the chosen team (one the caller may see)."""
    actor = session_of(request).actor
    chosen = request.query.get("team", "")
    if not chosen:
        return redirect(_home(actor))
    team = await request.app[GATEWAY].management.team(chosen, actor=actor)
    return redirect(team_url(team.id))


async def static(request: web.Request) -> web.Response:
    found = request.app[STATIC].get(request.match_info["name"])
    if found is None:
        return await error_page(request, 404, "Not found", "There is no such file.")
    body, content_type = found
    return web.Response(body=body, content_type=content_type, headers={"Cache-Control": "no-cache"})
