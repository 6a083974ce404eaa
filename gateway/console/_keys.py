"""The API Keys page: list, create (the key shown once), revoke and rotate with a grace period."""

from __future__ import annotations

import time

from aiohttp import web

from gateway.app import GATEWAY
from gateway.console._checks import actor, problems, read_form, text
from gateway.console._html import Markup, fmt, join
from gateway.console._layout import (
    error_summary,
    field_error,
    hidden_csrf,
    invalid,
    page,
    redirect,
    team_url,
    when,
)
from gateway.console._state import TEMPLATES, session_of
from gateway.manage import CreatedKey, Management
from gateway.manage.bounds import NAME_MAX
from gateway.manage.inputs import Fields, Unknown, id_cursor
from gateway.models import ApiKey, Team
from gateway.serialize import key_status
from gateway.storage import Conflict

__all__ = ["create_key", "keys", "revoke_form", "revoke_key", "rotate_form", "rotate_key", "team"]

KEYS_PER_PAGE = 100
ENVIRONMENTS = (("live", "Live (ckiq_live_…)"), ("test", "Test (ckiq_test_…)"))
GRACE_CHOICES = (
    (0, "None: the old key stops working at once"),
    (3600, "1 hour"),
    (86400, "24 hours"),
    (7 * 86400, "7 days"),
)


def _m(request: web.Request) -> Management:
    return request.app[GATEWAY].management


async def team(request: web.Request) -> Team:
    """The path's team, as the signed-in party may see it (404 outside a token's team)."""
    return await _m(request).team(request.match_info["team"], actor=actor(request))


async def _key(request: web.Request, owner: Team) -> ApiKey:
    key = await _m(request).key(request.match_info["key_id"], actor=actor(request))
    if key.team_id != owner.id:
        raise Unknown("key", "key_id")
    return key


def _options(choices: tuple[tuple[str, str], ...], selected: str) -> Markup:
    return join(
        fmt(
            '<option value="$v"$s>$label</option>',
            v=value,
            label=label,
            s=Markup(" selected") if value == selected else Markup(""),
        )
        for value, label in choices
    )


def _status(key: ApiKey, now: float) -> Markup:
    status = key_status(key, now)
    if status == "revoked":
        return fmt('<span class="badge badge-revoked">Revoked</span> $at', at=when(key.revoked_at))
    if status == "active" and key.expires_at is not None:
        return fmt(
            '<span class="badge badge-active">Active</span> until $at', at=when(key.expires_at)
        )
    return fmt('<span class="badge badge-$s">$label</span>', s=status, label=status.capitalize())


def _limits(key: ApiKey, spent: tuple[int, int] | None) -> Markup:
    """A key's spend caps with what it has spent, and its request quotas; a dash if none."""
    day, month = spent or (0, 0)
    parts = []
    if key.credit_cap_per_day is not None:
        parts.append(fmt("$s of $c credits today", s=f"{day:,}", c=f"{key.credit_cap_per_day:,}"))
    if key.credit_cap_per_month is not None:
        parts.append(
            fmt("$s of $c credits this month", s=f"{month:,}", c=f"{key.credit_cap_per_month:,}")
        )
    if key.quota_per_day is not None:
        parts.append(fmt("$q requests a day", q=f"{key.quota_per_day:,}"))
    if key.quota_per_month is not None:
        parts.append(fmt("$q requests a month", q=f"{key.quota_per_month:,}"))
    if not parts:
        return Markup('<span class="muted">—</span>')
    return join(parts, "<br>")


def _row(owner: Team, key: ApiKey, now: float, spent: tuple[int, int] | None) -> Markup:
    actions = Markup('<span class="muted">—</span>')
    if key.revoked_at is None:
        base = team_url(owner.id, f"keys/{key.id}")
        actions = fmt(
            '<a class="button small secondary" href="$rotate">Rotate…'
            '<span class="visually-hidden"> key $name</span></a> '
            '<a class="button small danger" href="$revoke">Revoke…'
            '<span class="visually-hidden"> key $name</span></a>',
            rotate=f"{base}/rotate",
            revoke=f"{base}/revoke",
            name=key.name,
        )
    return fmt(
        '<tr data-key-id="$id"><th scope="row">$name</th><td><code>$prefix…</code></td>'
        "<td>$env</td><td>$created</td><td>$used</td><td>$status</td>"
        '<td class="key-limits">$limits</td><td class="row-actions">$actions</td></tr>',
        id=key.id,
        name=key.name,
        prefix=key.prefix,
        env=key.environment,
        created=when(key.created_at),
        used=when(key.last_used_at),
        status=_status(key, now),
        limits=_limits(key, spent),
        actions=actions,
    )


async def _keys_page(
    request: web.Request,
    owner: Team,
    *,
    errors: dict[str, str] | None = None,
    name: str = "",
    environment: str = "live",
    dialog: Markup | None = None,
    status: int = 200,
) -> web.Response:
    errors = errors or {}
    after = id_cursor(request.query.get("after") or None, "key", "after")
    listed = await _m(request).keys(owner.id, KEYS_PER_PAGE, after, actor=actor(request))
    now = time.time()
    spending = await _m(request).key_spending(listed)
    if listed:
        rows = join(_row(owner, k, now, spending.get(k.id)) for k in listed)
        table = fmt(
            '<div class="table-wrap" role="region" aria-labelledby="list-title" tabindex="0">'
            '<table><thead><tr><th scope="col">Name</th><th scope="col">Prefix</th>'
            '<th scope="col">Environment</th><th scope="col">Created</th>'
            '<th scope="col">Last used</th><th scope="col">Status</th>'
            '<th scope="col">Caps and quotas</th><th scope="col">Actions</th>'
            "</tr></thead><tbody>$rows</tbody></table></div>",
            rows=rows,
        )
    else:
        table = Markup('<p class="empty">No keys yet. Create the first one above.</p>')
    pager = Markup("")
    if len(listed) == KEYS_PER_PAGE or after:
        links = []
        if after:
            links.append(fmt('<a href="$h">First page</a>', h=team_url(owner.id)))
        if len(listed) == KEYS_PER_PAGE:
            links.append(
                fmt('<a href="$h">Next keys →</a>', h=team_url(owner.id, after=listed[-1].id))
            )
        pager = fmt('<p class="pager">$links</p>', links=join(links, " "))
    body = request.app[TEMPLATES].render(
        "keys",
        dialog=dialog or Markup(""),
        summary=error_summary(errors),
        action=team_url(owner.id),
        csrf=hidden_csrf(request),
        nonce=session_of(request).issue_nonce(),
        name=name,
        name_invalid=invalid(errors, "name"),
        name_error=field_error(errors, "name"),
        environments=_options(ENVIRONMENTS, environment),
        table=table,
        pager=pager,
    )
    return await page(
        request,
        title=f"API Keys · {owner.name}",
        body=body,
        team=owner,
        current="keys",
        status=status,
    )


def _dialog(
    request: web.Request, owner: Team, created: CreatedKey, heading: str, note: Markup
) -> Markup:
    return request.app[TEMPLATES].render(
        "key_created",
        heading=heading,
        name=created.key.name,
        environment=created.key.environment,
        secret=created.secret,
        note=note,
        done=team_url(owner.id),
    )


async def keys(request: web.Request) -> web.Response:
    return await _keys_page(request, await team(request))


async def create_key(request: web.Request) -> web.Response:
    owner = await team(request)
    session = session_of(request)
    form = await read_form(request)
    if not session.spend_nonce(text(form.get("nonce"))):
        session.flash("error", "That form was already sent: no second key was created.")
        return redirect(team_url(owner.id))
    name, environment = text(form.get("name")), text(form.get("environment")) or "live"
    fields = Fields({"name": name, "environment": environment}, {"name", "environment"})
    fields.string("name", required=True, max_len=NAME_MAX)
    fields.choice("environment", ("live", "test"), "live")
    errors = problems(fields)
    if errors:
        return await _keys_page(
            request, owner, errors=errors, name=name, environment=environment, status=422
        )
    created = await _m(request).create_key(
        owner.id, name, "live" if environment == "live" else "test", actor=actor(request)
    )
    # The key goes into this one response and nowhere else: not the session, not a redirect.
    dialog = _dialog(request, owner, created, "Your new API key", Markup(""))
    return await _keys_page(request, owner, dialog=dialog)


async def revoke_form(request: web.Request) -> web.Response:
    owner = await team(request)
    key = await _key(request, owner)
    body = request.app[TEMPLATES].render(
        "confirm",
        heading="Revoke this API key?",
        text=fmt(
            "<p>Revoke <strong>$name</strong> (<code>$prefix…</code>, $env)? Requests with it "
            "are refused within a second. <strong>This cannot be undone.</strong></p>",
            name=key.name,
            prefix=key.prefix,
            env=key.environment,
        ),
        action=team_url(owner.id, f"keys/{key.id}/revoke"),
        csrf=hidden_csrf(request),
        fields=Markup(""),
        kind="danger",
        button="Revoke key",
        cancel=team_url(owner.id),
    )
    return await page(request, title="Revoke key", body=body, team=owner, current="keys")


async def revoke_key(request: web.Request) -> web.Response:
    owner = await team(request)
    key = await _key(request, owner)
    session = session_of(request)
    try:
        await _m(request).revoke_key(key.id, actor=actor(request))
    except Conflict:
        session.flash("error", f"Key “{key.name}” was already revoked.")
        return redirect(team_url(owner.id))
    session.flash("ok", f"Key “{key.name}” ({key.prefix}…) is revoked.")
    return redirect(team_url(owner.id))


async def rotate_form(request: web.Request) -> web.Response:
    owner = await team(request)
    key = await _key(request, owner)
    if key.revoked_at is not None:
        session_of(request).flash("error", f"Key “{key.name}” is revoked: it cannot be rotated.")
        return redirect(team_url(owner.id))
    grace = join(
        fmt(
            '<option value="$v"$s>$label</option>',
            v=str(v),
            label=label,
            s=Markup(" selected") if v == 3600 else Markup(""),
        )
        for v, label in GRACE_CHOICES
    )
    body = request.app[TEMPLATES].render(
        "confirm",
        heading="Rotate this API key?",
        text=fmt(
            "<p>A new key replaces <strong>$name</strong> (<code>$prefix…</code>) with the same "
            "settings. The new key is shown once. The old key keeps working for the grace "
            "period you choose, so you can update your applications first.</p>",
            name=key.name,
            prefix=key.prefix,
        ),
        action=team_url(owner.id, f"keys/{key.id}/rotate"),
        csrf=hidden_csrf(request),
        fields=fmt(
            '<input type="hidden" name="nonce" value="$nonce">'
            '<label for="grace">Grace period for the old key</label>'
            '<select id="grace" name="grace_seconds">$grace</select>',
            nonce=session_of(request).issue_nonce(),
            grace=grace,
        ),
        kind="primary",
        button="Rotate key",
        cancel=team_url(owner.id),
    )
    return await page(request, title="Rotate key", body=body, team=owner, current="keys")


async def rotate_key(request: web.Request) -> web.Response:
    owner = await team(request)
    key = await _key(request, owner)
    session = session_of(request)
    form = await read_form(request)
    if not session.spend_nonce(text(form.get("nonce"))):
        session.flash("error", "That form was already sent: the key was not rotated again.")
        return redirect(team_url(owner.id))
    allowed = {str(v): v for v, _ in GRACE_CHOICES}
    grace = allowed.get(text(form.get("grace_seconds")))
    if grace is None:
        session.flash("error", "Choose one of the offered grace periods.")
        return redirect(team_url(owner.id, f"keys/{key.id}/rotate"))
    try:
        created = await _m(request).rotate_key(key.id, grace, actor=actor(request))
    except Conflict:
        session.flash("error", f"Key “{key.name}” is revoked: it cannot be rotated.")
        return redirect(team_url(owner.id))
    note = fmt(
        '<p class="note">The old key <code>$prefix…</code> $until.</p>',
        prefix=key.prefix,
        until=Markup("stopped working now")
        if grace == 0
        else fmt("keeps working until $at", at=when(time.time() + grace)),
    )
    dialog = _dialog(request, owner, created, "Your rotated API key", note)
    return await _keys_page(request, owner, dialog=dialog)
