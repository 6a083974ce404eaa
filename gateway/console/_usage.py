"""The Usage page: requests over time by outcome, credits charged, top keys, anomalies."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from aiohttp import web

from gateway.anomaly import Anomaly, AnomalyDetector
from gateway.app import GATEWAY
from gateway.console._chart import (
    LABELS,
    OUTCOMES,
    Bucket,
    Marker,
    bucket_label,
    legend,
    stacked_bars,
)
from gateway.console._checks import actor
from gateway.console._html import Markup, fmt, join
from gateway.console._keys import team
from gateway.console._layout import page, team_url, when
from gateway.console._state import TEMPLATES, session_of
from gateway.models import ApiKey, Team

__all__ = ["usage"]


@dataclass(frozen=True, slots=True)
class Range:
    label: str
    step: int
    buckets: int
    per: str


RANGES = {
    "24h": Range("Last 24 hours, by hour", 3600, 24, "per hour"),
    "7d": Range("Last 7 days, by day", 86400, 7, "per day"),
    "30d": Range("Last 30 days, by day", 86400, 30, "per day"),
}
KIND_LABELS = {
    "rate_spike": "Rate spike",
    "new_ips": "New client addresses",
    "auth_failures": "Refused credentials",
}
REFUSED = (
    "unauthorized",
    "rate_limited",
    "insufficient_credits",
    "payload_too_large",
    "bad_request",
    "not_found",
    "unavailable",
)


def _parse(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def _stat(name: str, label: str, value: str, hint: str = "") -> Markup:
    return fmt(
        '<div class="stat" data-stat="$name"><p class="label">$label</p>'
        '<p class="value">$value</p><p class="hint">$hint</p></div>',
        name=name,
        label=label,
        value=value,
        hint=hint,
    )


def _key_label(key_id: str, known: dict[str, ApiKey]) -> Markup:
    key = known.get(key_id)
    if key is None:
        return fmt("<code>$id</code>", id=key_id)
    return fmt("$name <code>$prefix…</code>", name=key.name, prefix=key.prefix)


def _with_requests(team_id: str, key_id: str, known: dict[str, ApiKey]) -> Markup:
    """A key named in a signal, with a link to the requests behind it."""
    return fmt(
        '$label (<a href="$href">its requests</a>)',
        label=_key_label(key_id, known),
        href=team_url(team_id, "requests", key_id=key_id),
    )


def _cell(count: int) -> Markup:
    return fmt('<td class="num">$n</td>', n=f"{count:,}")


def _table(buckets: list[Bucket], step: int, present: list[str]) -> Markup:
    head = join(fmt('<th scope="col" class="num">$l</th>', l=LABELS[o]) for o in present)
    rows = join(
        fmt(
            '<tr><th scope="row">$when</th><td class="num">$total</td>$cells'
            '<td class="num">$credits</td></tr>',
            when=bucket_label(b.start, step, long=True),
            total=f"{b.total:,}",
            cells=join(_cell(b.counts.get(o, 0)) for o in present),
            credits=f"{b.credits:,}",
        )
        for b in buckets
    )
    return fmt(
        '<div class="table-wrap" role="region" aria-label="Requests per period" tabindex="0">'
        '<table><thead><tr><th scope="col">Period (UTC)</th><th scope="col" class="num">Total</th>'
        '$head<th scope="col" class="num">Credits</th></tr></thead><tbody>$rows</tbody></table>'
        "</div>",
        head=head,
        rows=rows,
    )


def _anomaly_item(kind: str, at: float, subject: Markup, detail: str) -> Markup:
    return fmt(
        '<li><span class="badge badge-anomaly">$kind</span> $at · $subject: $detail</li>',
        kind=KIND_LABELS.get(kind, kind),
        at=when(at),
        subject=subject,
        detail=detail,
    )


async def _failures(request: web.Request, start: float, end: float) -> Markup:
    """Operators only: refused credentials by prefix and address, across all teams."""
    rows = await request.app[GATEWAY].management.auth_failures(start, end, 20, actor=actor(request))
    detector = request.app[GATEWAY].anomalies
    signals = [
        a
        for a in (detector.recent if detector is not None else ())
        if a.kind == "auth_failures" and start <= a.at <= end
    ]
    if rows:
        table = fmt(
            '<div class="table-wrap" role="region" aria-labelledby="failures-title" tabindex="0">'
            '<table><thead><tr><th scope="col">Key prefix</th><th scope="col">Client address</th>'
            '<th scope="col">Reason</th><th scope="col" class="num">Refused</th></tr></thead>'
            "<tbody>$rows</tbody></table></div>",
            rows=join(
                fmt(
                    "<tr><td>$p</td><td><code>$ip</code></td><td>$r</td>"
                    '<td class="num">$n</td></tr>',
                    p=fmt("<code>$p…</code>", p=f.key_prefix)
                    if f.key_prefix
                    else Markup('<span class="muted">none</span>'),
                    ip=f.client_ip,
                    r=f.reason,
                    n=f"{f.failures:,}",
                )
                for f in rows
            ),
        )
    else:
        table = Markup('<p class="empty">No refused credentials in this period.</p>')
    items = join(
        _anomaly_item(a.kind, a.at, fmt("<code>$s</code>", s=a.subject), a.detail)
        for a in reversed(signals)
    )
    listed = fmt('<ul class="anomalies">$items</ul>', items=items) if signals else Markup("")
    return fmt(
        '<section aria-labelledby="failures-title"><h2 id="failures-title">Authentication '
        'failures, all teams</h2><p class="hint">Operators only. Refused credentials by key '
        "prefix and client address.</p>$listed$table</section>",
        listed=listed,
        table=table,
    )


def _anomalies(
    detector: AnomalyDetector | None, team_id: str, start: float, end: float,
    known: dict[str, ApiKey],
) -> tuple[list[Anomaly], Markup]:  # fmt: skip
    """The team's signals in the period, and their list (each linked to its requests)."""
    signals = [
        a
        for a in (detector.recent if detector is not None else ())
        if a.team_id == team_id and start <= a.at <= end
    ]
    if detector is None:
        return signals, Markup('<p class="empty">Anomaly detection is switched off.</p>')
    if not signals:
        return signals, Markup('<p class="empty">No anomalies in this period.</p>')
    return signals, fmt(
        '<p class="hint">Marked ▼ on the chart. Signals raised by this gateway process.</p>'
        '<ul class="anomalies">$items</ul>',
        items=join(
            _anomaly_item(a.kind, a.at, _with_requests(team_id, a.subject, known), a.detail)
            for a in reversed(signals)
        ),
    )


def _top_keys(top: list[dict[str, Any]], known: dict[str, ApiKey]) -> Markup:
    if not top:
        return Markup('<p class="empty">No requests in this period.</p>')
    return fmt(
        '<div class="table-wrap" role="region" aria-labelledby="top-title" tabindex="0">'
        '<table><thead><tr><th scope="col">Key</th><th scope="col" class="num">Requests</th>'
        '<th scope="col" class="num">Credits</th></tr></thead><tbody>$rows</tbody></table>'
        "</div>",
        rows=join(
            fmt(
                '<tr><th scope="row">$k</th><td class="num">$r</td><td class="num">$c</td></tr>',
                k=_key_label(t["key"], known),
                r=f"{t['requests']:,}",
                c=f"{t['credits']:,}",
            )
            for t in top
        ),
    )


def _stats(report: dict[str, Any], totals: dict[str, int], label: str) -> Markup:
    total = int(report["totals"]["total"])
    ok = totals.get("ok", 0)
    refused = sum(totals.get(o, 0) for o in REFUSED)
    return join(
        [
            _stat("requests", "Requests", f"{total:,}", label.lower()),
            _stat("ok", "Successful", f"{ok:,}", f"{ok / total:.0%} of requests" if total else "—"),
            _stat(
                "credits",
                "Credits charged",
                f"{int(report['totals']['credits']):,}",
                "successful answers",
            ),
            _stat(
                "refused",
                "Refused by the gateway",
                f"{refused:,}",
                "401, 402, 429 and other refusals",
            ),
        ]
    )


def _ranges(chosen: str) -> Markup:
    return join(
        fmt(
            '<option value="$v"$s>$l</option>',
            v=v,
            l=r.label,
            s=Markup(" selected") if v == chosen else Markup(""),
        )
        for v, r in RANGES.items()
    )


async def usage(request: web.Request) -> web.Response:
    owner: Team = await team(request)
    gateway = request.app[GATEWAY]
    chosen = request.query.get("range", "24h")
    span = RANGES.get(chosen)
    if span is None:
        chosen, span = "24h", RANGES["24h"]
    end = time.time()
    # Whole periods, the current one last: 24 hours are 24 bars, 7 days 7 bars.
    start = (math.floor(end / span.step) - span.buckets + 1) * span.step
    report: dict[str, Any] = await gateway.management.usage(
        owner.id, start, end, span.step, actor=actor(request)
    )
    buckets = [
        Bucket(_parse(b["start"]), dict(b["requests"]), int(b["credits"]))
        for b in report["buckets"]
    ]
    totals: dict[str, int] = report["totals"]["requests"]
    present = [o for o, _ in OUTCOMES if totals.get(o)]
    listed = await gateway.management.keys(owner.id, 1000, actor=actor(request))
    known = {k.id: k for k in listed}

    signals, anomalies = _anomalies(gateway.anomalies, owner.id, start, end, known)
    markers = [Marker(a.at, f"{KIND_LABELS.get(a.kind, a.kind)}: {a.detail}") for a in signals]
    top_html = _top_keys(report["top_keys"], known)
    stats = _stats(report, totals, span.label)
    ranges = _ranges(chosen)
    failures = (
        await _failures(request, start, end) if session_of(request).actor.is_admin else Markup("")
    )
    body = request.app[TEMPLATES].render(
        "usage",
        action=team_url(owner.id, "usage"),
        ranges=ranges,
        stats=stats,
        per=span.per,
        chart=stacked_bars(
            buckets, span.step, f"Requests {span.per} by outcome, {span.label.lower()}", markers
        ),
        legend=legend(present),
        table=_table(buckets, span.step, present),
        anomalies=anomalies,
        top=top_html,
        failures=failures,
    )
    return await page(
        request, title=f"Usage · {owner.name}", body=body, team=owner, current="usage"
    )
