"""Stacked bars of requests per period by outcome, drawn as inline SVG on the server.

No script and no chart library: the picture is plain SVG styled by the console's
stylesheet (colours per outcome are CSS variables, one place), each bar carries a
``<title>`` for a tooltip, and the same numbers are on the page as a table.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from gateway.console._html import Markup, fmt, join

__all__ = ["OUTCOMES", "Bucket", "Marker", "bucket_label", "legend", "stacked_bars"]

# Every outcome of contract §1, in stacking order (bottom first), with its legend text.
OUTCOMES: tuple[tuple[str, str], ...] = (
    ("ok", "Success"),
    ("client_error", "Client error (4xx)"),
    ("upstream_error", "Upstream error (5xx, 502, 504)"),
    ("unauthorized", "Unauthorized (401)"),
    ("rate_limited", "Rate limited (429)"),
    ("insufficient_credits", "Out of credits (402)"),
    ("payload_too_large", "Too large (413)"),
    ("bad_request", "Bad request (400)"),
    ("not_found", "Not found (404, 405)"),
    ("replayed", "Idempotent replay"),
    ("unavailable", "Unavailable (503)"),
)
LABELS = dict(OUTCOMES)

WIDTH, HEIGHT = 960, 300
LEFT, RIGHT, TOP, BOTTOM = 56, 16, 28, 44


@dataclass(frozen=True, slots=True)
class Bucket:
    start: float
    counts: dict[str, int]
    credits: int

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@dataclass(frozen=True, slots=True)
class Marker:
    """An anomaly drawn over the bar of the period it happened in."""

    at: float
    text: str


def bucket_label(start: float, step: int, long: bool = False) -> str:
    moment = datetime.fromtimestamp(start, UTC)
    if step >= 86400:
        return moment.strftime("%a %d %b" if long else "%d %b")
    if long:
        return moment.strftime("%d %b %H:%M")
    return moment.strftime("%d %b" if moment.hour == 0 else "%H:%M")


def _nice_step(peak: int) -> int:
    """A round gridline step (1, 2 or 5 times a power of ten) giving about four lines."""
    raw = max(peak / 4, 1)
    power = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 5, 10):
        if raw <= factor * power:
            return int(factor * power)
    return int(10 * power)  # pragma: no cover - the loop always returns


def stacked_bars(
    buckets: Sequence[Bucket], step: int, title: str, markers: Sequence[Marker] = ()
) -> Markup:
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    peak = max((b.total for b in buckets), default=0)
    grid = _nice_step(peak)
    top_value = max(grid * math.ceil(peak / grid), 4)  # a multiple of grid: grid <= 2 then
    slot = plot_w / max(len(buckets), 1)
    bar_w = max(slot * 0.7, 1.0)

    def y(value: float) -> float:
        return TOP + plot_h - value / top_value * plot_h

    parts: list[Markup] = []
    for value in range(0, top_value + 1, grid):
        parts.append(
            fmt(
                '<line class="grid" x1="$x1" x2="$x2" y1="$y" y2="$y"/>'
                '<text class="tick" x="$tx" y="$ty" text-anchor="end">$v</text>',
                x1=LEFT,
                x2=WIDTH - RIGHT,
                y=f"{y(value):.1f}",
                tx=LEFT - 8,
                ty=f"{y(value) + 4:.1f}",
                v=f"{value:,}",
            )
        )
    every = max(1, math.ceil(len(buckets) / 12))
    for i, bucket in enumerate(buckets):
        x = LEFT + i * slot + (slot - bar_w) / 2
        rects: list[Markup] = []
        base = 0
        for outcome, _ in OUTCOMES:
            count = bucket.counts.get(outcome, 0)
            if not count:
                continue
            top, bottom = y(base + count), y(base)
            rects.append(
                fmt(
                    '<rect class="o-$o" x="$x" y="$y" width="$w" height="$h"/>',
                    o=outcome,
                    x=f"{x:.1f}",
                    y=f"{top:.1f}",
                    w=f"{bar_w:.1f}",
                    h=f"{max(bottom - top, 1.0):.1f}",
                )
            )
            base += count
        detail = ", ".join(
            f"{LABELS[o]} {bucket.counts[o]:,}" for o, _ in OUTCOMES if bucket.counts.get(o)
        )
        summary = f"{bucket_label(bucket.start, step, long=True)} UTC: {bucket.total:,} requests"
        if detail:
            summary += f" ({detail}), {bucket.credits:,} credits"
        # A full-height transparent target makes even an empty period show its tooltip.
        parts.append(
            fmt(
                '<g class="bar"><title>$t</title><rect class="hit" x="$x" y="$top" width="$w" '
                'height="$h"/>$rects</g>',
                t=summary,
                x=f"{LEFT + i * slot:.1f}",
                top=TOP,
                w=f"{slot:.1f}",
                h=plot_h,
                rects=join(rects),
            )
        )
        if i % every == 0:
            parts.append(
                fmt(
                    '<text class="tick" x="$x" y="$y" text-anchor="middle">$label</text>',
                    x=f"{LEFT + (i + 0.5) * slot:.1f}",
                    y=HEIGHT - BOTTOM + 18,
                    label=bucket_label(bucket.start, step),
                )
            )
    if peak == 0:
        parts.append(
            fmt(
                '<text class="empty-note" x="$x" y="$y" text-anchor="middle">$t</text>',
                x=LEFT + plot_w / 2,
                y=TOP + plot_h / 2,
                t="No requests in this period",
            )
        )
    first = buckets[0].start if buckets else 0.0
    for marker in markers:
        index = int((marker.at - first) // step)
        if not 0 <= index < len(buckets):
            continue
        cx = LEFT + (index + 0.5) * slot
        parts.append(
            fmt(
                '<g class="anomaly"><title>$t</title>'
                '<line x1="$x" x2="$x" y1="$y1" y2="$y2"/>'
                '<path d="M$x $tip l-7 -12 h14 z"/></g>',
                t=marker.text,
                x=f"{cx:.1f}",
                y1=TOP,
                y2=TOP + plot_h,
                tip=TOP - 2,
            )
        )
    parts.append(
        fmt(
            '<line class="axis" x1="$x1" x2="$x2" y1="$y" y2="$y"/>',
            x1=LEFT,
            x2=WIDTH - RIGHT,
            y=TOP + plot_h,
        )
    )
    total = sum(b.total for b in buckets)
    busiest = max(buckets, key=lambda b: b.total, default=None)
    description = f"{total:,} requests in {len(buckets)} periods."
    if busiest is not None and busiest.total:
        description += (
            f" Busiest: {bucket_label(busiest.start, step, long=True)} UTC with {busiest.total:,}."
        )
    if markers:
        description += f" {len(markers)} anomaly marker(s)."
    return fmt(
        '<svg class="chart-svg" viewBox="0 0 $w $h" role="img" '
        'aria-labelledby="chart-svg-title chart-svg-desc" preserveAspectRatio="xMidYMid meet">'
        '<title id="chart-svg-title">$title</title><desc id="chart-svg-desc">$desc</desc>'
        "$parts</svg>",
        w=WIDTH,
        h=HEIGHT,
        title=title,
        desc=description,
        parts=join(parts),
    )


def legend(present: Sequence[str]) -> Markup:
    """The colour key for the outcomes that occur (always at least "Success")."""
    shown = [o for o, _ in OUTCOMES if o in present] or ["ok"]
    return fmt(
        '<ul class="legend">$items</ul>',
        items=join(
            fmt(
                '<li><span class="swatch o-$o" aria-hidden="true"></span>$label</li>',
                o=o,
                label=LABELS[o],
            )
            for o in shown
        ),
    )
