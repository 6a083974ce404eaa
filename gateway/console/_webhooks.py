"""The console's Webhooks page: a team's endpoints, their recent deliveries with their
status, where ``credits.low`` fires, and a button that sends a test event."""

from __future__ import annotations

from aiohttp import web

from gateway.app import GATEWAY
from gateway.console._checks import actor
from gateway.console._html import Markup, fmt, join
from gateway.console._keys import team
from gateway.console._layout import hidden_csrf, page, redirect, team_url, when
from gateway.console._state import TEMPLATES, session_of
from gateway.manage.inputs import Unknown
from gateway.models import Team
from gateway.storage.events import DeliveryAttempt, Endpoint

__all__ = ["send_test", "webhooks_page"]

RECENT_ATTEMPTS = 10


def _attempt(row: DeliveryAttempt) -> Markup:
    answer = str(row.status) if row.status is not None else "no answer"
    return fmt(
        "<tr><td>$at</td><td><code>$type</code></td><td>$state</td><td>$answer</td>"
        '<td class="num">$ms</td><td>$error</td><td>$next</td></tr>',
        at=when(row.at), type=row.event_type, state=row.state, answer=answer,
        ms=f"{row.latency_ms:.0f} ms", error=row.error or "",
        next=when(row.next_attempt_at) if row.next_attempt_at is not None else "",
    )  # fmt: skip


def _attempts(rows: list[DeliveryAttempt]) -> Markup:
    if not rows:
        return Markup('<p class="empty">No deliveries yet.</p>')
    return fmt(
        '<div class="table-wrap"><table><thead><tr><th scope="col">Time</th>'
        '<th scope="col">Event</th><th scope="col">Delivery</th><th scope="col">Answer</th>'
        '<th scope="col" class="num">Latency</th><th scope="col">Error</th>'
        '<th scope="col">Next attempt</th></tr></thead><tbody>$rows</tbody></table></div>',
        rows=join(_attempt(r) for r in rows),
    )


def _endpoint(request: web.Request, owner: Team, hook: Endpoint,
              attempts: list[DeliveryAttempt]) -> Markup:  # fmt: skip
    if hook.enabled:
        status = Markup('<span class="badge badge-active">enabled</span>')
    else:
        status = fmt('<span class="badge badge-disabled">disabled</span> $why',
                     why=hook.disabled_reason or "by hand")  # fmt: skip
    return fmt(
        '<section class="card" aria-labelledby="$id-title"><h2 id="$id-title"><code>$url</code>'
        "</h2><p>$status · events: <code>$events</code> · $description</p>"
        '<form method="post" action="$test">$csrf<button type="submit">Send test event'
        "</button></form>$attempts</section>",
        id=hook.id, url=hook.url, status=status, events=", ".join(hook.events),
        description=hook.description or "no description",
        test=team_url(owner.id, f"webhooks/{hook.id}/test"), csrf=hidden_csrf(request),
        attempts=_attempts(attempts),
    )  # fmt: skip


async def webhooks_page(request: web.Request) -> web.Response:
    owner: Team = await team(request)
    management = request.app[GATEWAY].management
    who = actor(request)
    hooks = await management.webhooks(owner.id, actor=who)
    sections = [
        _endpoint(request, owner, hook,
                  await management.webhook_attempts(hook.id, RECENT_ATTEMPTS, actor=who))
        for hook in hooks
    ]  # fmt: skip
    alerts = await management.alerts(owner.id, actor=who)
    alert_line = ", ".join(
        f"{env}: below {threshold}" if threshold is not None else f"{env}: off"
        for env, threshold in alerts.items()
    )
    body = request.app[TEMPLATES].render(
        "webhooks",
        endpoints=join(sections) if sections else Markup(
            '<p class="empty">No webhook endpoints. Add one with <code>gateway webhooks create'
            "</code> or <code>POST /admin/v1/teams/{team}/webhooks</code>.</p>"
        ),
        alerts=alert_line,
    )  # fmt: skip
    return await page(request, title=f"Webhooks · {owner.name}", body=body, team=owner,
                      current="webhooks")  # fmt: skip


async def send_test(request: web.Request) -> web.Response:
    owner: Team = await team(request)
    management = request.app[GATEWAY].management
    session = session_of(request)
    try:
        hook = await management.webhook(request.match_info["webhook_id"], actor=actor(request))
        if hook.team_id != owner.id:
            raise Unknown("webhook", "webhook_id")
        event = await management.test_webhook(hook.id, actor=actor(request))
    except Unknown:
        session.flash("error", "No such webhook endpoint.")
        return redirect(team_url(owner.id, "webhooks"))
    session.flash("ok", f"Test event {event} queued for {hook.url}.")
    return redirect(team_url(owner.id, "webhooks"))
