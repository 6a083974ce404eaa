"""The console's Requests page: one team's request log, by key, status, address and path."""

from __future__ import annotations

from aiohttp import web

from gateway.app import GATEWAY
from gateway.console._checks import actor
from gateway.console._html import Markup, fmt, join
from gateway.console._keys import team
from gateway.console._layout import error_summary, page, team_url, when
from gateway.console._state import TEMPLATES
from gateway.manage.inputs import InputError
from gateway.manage.requests import RequestFilters, RequestPage
from gateway.models import Team
from gateway.storage import LoggedRequest

__all__ = ["requests_page"]

PAGE_ROWS = 50
_FILTERS = ("key_id", "status", "client_ip", "path_prefix")


def _row(row: LoggedRequest, names: dict[str, str]) -> Markup:
    e = row.entry
    return fmt(
        '<tr><td>$at</td><td>$status</td><td>$outcome</td><td class="num">$credits</td>'
        "<td><code>$method $path</code></td><td>$key <code>$prefix…</code></td>"
        "<td><code>$ip</code></td></tr>",
        at=when(e.at),
        status=e.status,
        outcome=e.outcome.replace("_", " "),
        credits=e.credits,
        method=e.method,
        path=e.path,
        key=names.get(e.key_id, e.key_id),
        prefix=e.key_prefix,
        ip=e.client_ip,
    )


def _table(rows: list[LoggedRequest], names: dict[str, str]) -> Markup:
    if not rows:
        return Markup('<p class="empty">No requests match.</p>')
    return fmt(
        '<div class="table-wrap" role="region" aria-labelledby="list-title" tabindex="0">'
        '<table><thead><tr><th scope="col">Time</th><th scope="col">Status</th>'
        '<th scope="col">Outcome</th><th scope="col" class="num">Credits</th>'
        '<th scope="col">Request</th><th scope="col">Key</th><th scope="col">Client address</th>'
        "</tr></thead><tbody>$rows</tbody></table></div>",
        rows=join(_row(r, names) for r in rows),
    )


def _key_options(names: dict[str, str], chosen: str) -> Markup:
    options = [fmt('<option value="">All keys</option>')]
    options += [
        fmt(
            '<option value="$id"$s>$name</option>',
            id=key_id,
            name=name,
            s=Markup(" selected") if key_id == chosen else Markup(""),
        )
        for key_id, name in names.items()
    ]
    return join(options)


async def requests_page(request: web.Request) -> web.Response:
    owner: Team = await team(request)
    management = request.app[GATEWAY].management
    given = {name: request.query.get(name, "").strip() for name in _FILTERS}
    filters = RequestFilters(
        key_id=given["key_id"] or None,
        status=given["status"] or None,
        client_ip=given["client_ip"] or None,
        path_prefix=given["path_prefix"] or None,
    )
    errors: dict[str, str] = {}
    try:
        found = await management.requests(
            owner.id, filters, PAGE_ROWS, request.query.get("cursor") or None, actor=actor(request)
        )
    except InputError as exc:
        # Shown above the form it came from, the form keeping what was typed.
        errors = {d["field"]: f"{d['field'].replace('_', ' ')} {d['problem']}" for d in exc.details}
        found = RequestPage([], None)
    keys = await management.keys(owner.id, 1000, actor=actor(request))
    names = {k.id: k.name for k in keys}
    more = (
        fmt('<p><a href="$href">Older requests</a></p>',
            href=team_url(owner.id, "requests", **{k: v for k, v in given.items() if v},
                          cursor=found.next_cursor))
        if found.next_cursor is not None
        else Markup("")
    )  # fmt: skip
    body = request.app[TEMPLATES].render(
        "requests",
        action=team_url(owner.id, "requests"),
        keys=_key_options(names, given["key_id"]),
        heading="Matching requests" if any(given.values()) else "Latest requests",
        table=error_summary(errors) if errors else _table(found.rows, names),
        more=more,
        **{name: given[name] for name in ("status", "client_ip", "path_prefix")},
    )
    return await page(
        request, title=f"Requests · {owner.name}", body=body, team=owner, current="requests",
        status=422 if errors else 200,
    )  # fmt: skip
