"""The Credits page: balance per environment, the ledger (paged), grants by operators."""

from __future__ import annotations

import contextlib

from aiohttp import web

from gateway.app import GATEWAY
from gateway.console._checks import actor, problems, read_form, text
from gateway.console._html import Markup, fmt, join
from gateway.console._keys import ENVIRONMENTS, team
from gateway.console._layout import (
    error_page,
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
from gateway.manage.bounds import AMOUNT_MAX, REASON_MAX
from gateway.manage.inputs import Fields, InputError, parse_int
from gateway.manage.plans import PlanView
from gateway.models import LedgerEntry, Team
from gateway.storage import Conflict

__all__ = ["credits", "grant"]

ENTRIES_PER_PAGE = 25
KINDS = {
    "grant": "Grant",
    "adjust": "Adjustment",
    "reserve": "Reserved (in flight)",
    "post": "Charged",
    "void": "Returned",
    "expire_void": "Returned (lease expired)",
    "expire_post": "Charged (lease expired)",
    "refill": "Plan refill",
    "expire": "Plan allowance expired",
}


def _amount(value: int) -> Markup:
    sign = "plus" if value > 0 else "minus" if value < 0 else "zero"
    return fmt('<span class="amount amount-$sign">$text</span>', sign=sign, text=f"{value:+,}")


def _entry(entry: LedgerEntry) -> Markup:
    return fmt(
        '<tr><td>$at</td><td>$kind</td><td>$env</td><td class="num">$amount</td>'
        '<td class="text">$reason</td></tr>',
        at=when(entry.created_at),
        kind=KINDS.get(entry.kind, entry.kind),
        env=entry.environment,
        amount=_amount(entry.amount),
        reason=entry.reason or (f"request {entry.reservation_id}" if entry.reservation_id else ""),
    )


def _plan(view: PlanView | None) -> Markup:
    """A balance card's plan line: the allowance, what happens to the rest, the next refill."""
    if view is None:
        return Markup("")
    plan = view.plan
    return fmt(
        '<p class="hint plan">Plan: $allowance per $period ($rollover); next refill $next</p>',
        allowance=f"{plan.allowance:,}",
        period=plan.period,
        rollover="unused allowance expires" if plan.rollover == "expire" else "unused carries",
        next=when(view.next_refill_at),
    )


def _balance_cards(
    balances: dict[str, int], plans: dict[str, PlanView], unlimited_test: bool
) -> list[Markup]:
    cards = []
    for environment, label in (("live", "Live"), ("test", "Test")):
        if environment == "test" and unlimited_test:
            amount, hint = Markup("Unlimited"), "test credits are not metered on this gateway"
        else:
            amount, hint = fmt("$n", n=f"{balances.get(environment, 0):,}"), "credits available"
        cards.append(
            fmt(
                '<div class="balance" data-environment="$env"><p class="label">$label</p>'
                '<p class="value">$amount</p><p class="hint">$hint</p>$plan</div>',
                env=environment,
                label=label,
                amount=amount,
                hint=hint,
                plan=_plan(plans.get(environment)),
            )
        )
    return cards


def _ledger_table(entries: list[LedgerEntry]) -> Markup:
    if not entries:
        return Markup('<p class="empty">No ledger entries yet.</p>')
    return fmt(
        '<div class="table-wrap" role="region" aria-labelledby="ledger-title" tabindex="0">'
        '<table><thead><tr><th scope="col">When</th><th scope="col">What</th>'
        '<th scope="col">Environment</th><th scope="col" class="num">Amount</th>'
        '<th scope="col">Reason</th></tr></thead><tbody>$rows</tbody></table></div>',
        rows=join(_entry(e) for e in entries),
    )


def _grant_form(
    request: web.Request, owner: Team, errors: dict[str, str], values: dict[str, str]
) -> Markup:
    """The grant form, for the operator only."""
    if not session_of(request).actor.is_admin:
        return Markup("")
    return request.app[TEMPLATES].render(
        "grant",
        summary=error_summary(errors),
        action=team_url(owner.id, "credits"),
        csrf=hidden_csrf(request),
        nonce=session_of(request).issue_nonce(),
        amount=values.get("amount", ""),
        amount_invalid=invalid(errors, "amount"),
        amount_error=field_error(errors, "amount"),
        environments=join(
            fmt(
                '<option value="$v"$s>$label</option>',
                v=v,
                label=label,
                s=Markup(" selected") if v == values.get("environment", "live") else Markup(""),
            )
            for v, label in ENVIRONMENTS
        ),
        reason=values.get("reason", ""),
        reason_invalid=invalid(errors, "reason"),
        reason_error=field_error(errors, "reason"),
    )


async def _credits_page(
    request: web.Request,
    owner: Team,
    *,
    errors: dict[str, str] | None = None,
    values: dict[str, str] | None = None,
    status: int = 200,
) -> web.Response:
    errors, values = errors or {}, values or {}
    gateway = request.app[GATEWAY]
    management = gateway.management
    before = request.query.get("before") or None
    try:
        entries = await management.ledger(owner.id, ENTRIES_PER_PAGE, before, actor=actor(request))
    except InputError:
        return await error_page(request, 400, "Bad page link", "That ledger page is unknown.")
    _, balances = await management.balances(owner.id, actor=actor(request))
    views = await management.plans(owner.id, actor=actor(request))
    plans: dict[str, PlanView] = {v.plan.environment: v for v in views}
    unlimited_test = gateway.settings.credits.test_environment == "unlimited"
    cards = _balance_cards(balances, plans, unlimited_test)
    table = _ledger_table(entries)
    links = []
    if before:
        links.append(fmt('<a href="$h">Newest entries</a>', h=team_url(owner.id, "credits")))
    if len(entries) == ENTRIES_PER_PAGE:
        older = team_url(owner.id, "credits", before=entries[-1].cursor)
        links.append(fmt('<a href="$h">Older entries →</a>', h=older))
    pager = fmt('<p class="pager">$l</p>', l=join(links, " ")) if links else Markup("")
    form = _grant_form(request, owner, errors, values)
    body = request.app[TEMPLATES].render(
        "credits", balances=join(cards), grant=form, table=table, pager=pager
    )
    return await page(
        request,
        title=f"Credits · {owner.name}",
        body=body,
        team=owner,
        current="credits",
        status=status,
    )


async def credits(request: web.Request) -> web.Response:
    return await _credits_page(request, await team(request))


async def grant(request: web.Request) -> web.Response:
    owner = await team(request)
    session = session_of(request)
    if not session.actor.is_admin:
        # No form is shown to a team token; a forged POST is refused like the admin API does.
        return await error_page(request, 403, "Not allowed", "A team token may not grant credits.")
    form = await read_form(request)
    nonce = text(form.get("nonce"))
    if not session.spend_nonce(nonce):
        session.flash("error", "That form was already sent: no credits were granted twice.")
        return redirect(team_url(owner.id, "credits"))
    values = {k: text(form.get(k)) for k in ("amount", "environment", "reason")}
    raw_amount = values["amount"]
    amount: object = raw_amount or None
    # When it is not an integer in range, Fields names the problem below, as the admin API does.
    with contextlib.suppress(InputError):
        amount = parse_int(raw_amount, "amount", -AMOUNT_MAX, AMOUNT_MAX)
    fields = Fields(
        {
            "amount": amount,
            "environment": values["environment"] or "live",
            "reason": values["reason"] or None,
        },
        {"amount", "environment", "reason"},
    )
    checked = fields.integer("amount", required=True, minimum=-AMOUNT_MAX, maximum=AMOUNT_MAX)
    environment = fields.choice("environment", ("live", "test"), "live")
    reason = fields.string("reason", required=True, max_len=REASON_MAX)
    if checked == 0:
        fields.problem("amount", "must not be 0")
    errors = problems(fields)
    if errors or checked is None or reason is None:
        return await _credits_page(request, owner, errors=errors, values=values, status=422)
    try:
        granted = await request.app[GATEWAY].management.grant(
            owner.id,
            checked,
            reason,
            environment="live" if environment == "live" else "test",
            actor=actor(request),
            # The form's nonce: a grant that reached the store once is never applied twice.
            idempotency_key=f"console:{nonce}",
        )
    except Conflict as exc:
        errors = {"amount": f"Amount refused: {exc}."}
        return await _credits_page(request, owner, errors=errors, values=values, status=409)
    balance = granted.balance
    verb = "Granted" if checked > 0 else "Adjusted by"
    session.flash("ok", f"{verb} {checked:,} {environment} credits. New balance: {balance:,}.")
    return redirect(team_url(owner.id, "credits"))
