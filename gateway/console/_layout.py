"""The page frame every console page shares, and small rendering helpers."""

from __future__ import annotations

from datetime import UTC, datetime
from urllib.parse import quote, urlencode

from aiohttp import web

from gateway.app import GATEWAY
from gateway.console._html import Markup, fmt, join
from gateway.console._state import PREFIX, SESSION, TEMPLATES
from gateway.models import Team

__all__ = [
    "TEAM_PAGES",
    "error_page",
    "error_summary",
    "field_error",
    "hidden_csrf",
    "invalid",
    "page",
    "redirect",
    "team_url",
    "when",
]

TEAM_PAGES = (
    ("keys", "API Keys"),
    ("credits", "Credits"),
    ("usage", "Usage"),
    ("requests", "Requests"),
    ("webhooks", "Webhooks"),
)
MAX_PICKER_TEAMS = 1000


def team_url(team_id: str, page: str = "keys", **query: str) -> str:
    url = f"{PREFIX}/teams/{quote(team_id, safe='')}/{page}"
    return url + "?" + urlencode(query) if query else url


def redirect(location: str) -> web.Response:
    """303: after a POST the browser GETs the next page (a reload repeats nothing)."""
    return web.Response(status=303, headers={"Location": location})


def when(ts: float | None, never: str = "Never") -> Markup:
    """A moment as people read it, in UTC, with the machine-readable form alongside."""
    if ts is None:
        return fmt('<span class="muted">$never</span>', never=never)
    moment = datetime.fromtimestamp(int(ts), UTC)
    return fmt(
        '<time datetime="$iso">$text</time>',
        iso=moment.isoformat().replace("+00:00", "Z"),
        text=moment.strftime("%Y-%m-%d %H:%M UTC"),
    )


def hidden_csrf(request: web.Request) -> Markup:
    return fmt('<input type="hidden" name="csrf" value="$csrf">', csrf=request[SESSION].csrf)


async def _picker(request: web.Request, team: Team | None) -> Markup:
    """Operators switch teams from every page; a team token has only its own."""
    teams = await request.app[GATEWAY].management.teams(MAX_PICKER_TEAMS)
    current = team.id if team is not None else None
    options = join(
        fmt(
            '<option value="$id"$selected>$name</option>',
            id=t.id,
            name=t.name,
            selected=Markup(" selected") if t.id == current else Markup(""),
        )
        for t in teams
    )
    if current is None:
        options = Markup('<option value="" selected>Choose a team…</option>' + options)
    return fmt(
        '<form class="picker" method="get" action="$action">'
        '<label for="team-picker">Team</label>'
        '<select id="team-picker" name="team" required>$options</select>'
        '<button type="submit">Open</button>'
        '<a href="$all">All teams</a></form>',
        action=f"{PREFIX}/go",
        options=options,
        all=f"{PREFIX}/teams",
    )


def _team_nav(team: Team, current: str | None) -> Markup:
    links = join(
        fmt(
            '<li><a href="$href"$current>$label</a></li>',
            href=team_url(team.id, name),
            label=label,
            current=Markup(' aria-current="page"') if name == current else Markup(""),
        )
        for name, label in TEAM_PAGES
    )
    return fmt(
        '<nav class="tabs" aria-label="$label"><p class="team-name">$name</p><ul>$links</ul></nav>',
        label=f"Team {team.name}",
        name=team.name,
        links=links,
    )


async def page(
    request: web.Request,
    *,
    title: str,
    body: Markup,
    team: Team | None = None,
    current: str | None = None,
    status: int = 200,
    picker: bool = True,
) -> web.Response:
    """A whole HTML page: header (who, sign out, team picker), team tabs, flashes, body.

    ``picker=False`` for error pages: they must render even when the store is down.
    """
    session = request.get(SESSION)
    account = Markup("")
    flashes = Markup("")
    if session is not None:
        teams = picker and session.actor.is_admin
        picker_html = await _picker(request, team) if teams else Markup("")
        account = fmt(
            '$picker<div class="account"><span>Signed in as <strong>$who</strong></span>'
            '<form method="post" action="$action">$csrf'
            '<button type="submit" class="secondary">Sign out</button></form></div>',
            picker=picker_html,
            who=session.who,
            action=f"{PREFIX}/sign-out",
            csrf=hidden_csrf(request),
        )
        flashes = join(
            fmt(
                '<p class="flash flash-$kind" role="$role">$text</p>',
                kind=kind,
                role="alert" if kind == "error" else "status",
                text=text,
            )
            for kind, text in session.take_flashes()
        )
    html = request.app[TEMPLATES].render(
        "layout",
        title=title,
        home=PREFIX,
        account=account,
        tabs=_team_nav(team, current) if team is not None else Markup(""),
        flashes=flashes,
        body=body,
        static=f"{PREFIX}/static",
    )
    return web.Response(status=status, text=html, content_type="text/html", charset="utf-8")


async def error_page(request: web.Request, status: int, heading: str, text: str) -> web.Response:
    body = request.app[TEMPLATES].render("error", heading=heading, text=text, home=PREFIX)
    return await page(request, title=heading, body=body, status=status, picker=False)


def field_error(errors: dict[str, str], name: str) -> Markup:
    """The message under a field, tied to it by ``aria-describedby`` (id ``<name>-error``)."""
    if name not in errors:
        return Markup("")
    return fmt('<p class="field-error" id="$id">$text</p>', id=f"{name}-error", text=errors[name])


def invalid(errors: dict[str, str], name: str) -> Markup:
    """The attributes that mark a field invalid for assistive technology."""
    if name not in errors:
        return Markup("")
    return fmt(' aria-invalid="true" aria-describedby="$id"', id=f"{name}-error")


def error_summary(errors: dict[str, str]) -> Markup:
    if not errors:
        return Markup("")
    return fmt(
        '<div class="flash flash-error" role="alert"><p>Please correct:</p><ul>$items</ul></div>',
        items=join(fmt("<li>$text</li>", text=text) for text in errors.values()),
    )
