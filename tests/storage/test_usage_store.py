"""Usage counted per minute, folded into hours once old, on both backends: totals kept,
each hour's count at its start, a second fold a no-op, replicas folding at once exact."""

from __future__ import annotations

import asyncio

from gateway.models import UsageRow
from gateway.storage import Backend, UsageBucket
from tests.storage.conftest import Backends

H = 1_700_006_400  # a UTC midnight, so an hour's and a day's start
DAY = 86_400


def rows(team: str, other: str) -> list[UsageRow]:
    return [
        UsageRow(H, team, "k1", "live", "ok", 1, 1),  # the hour's own row
        UsageRow(H + 60, team, "k1", "live", "ok", 2, 2),
        UsageRow(H + 3540, team, "k1", "live", "ok", 3, 3),
        UsageRow(H + 120, team, "k1", "live", "rate_limited", 4, 0),
        UsageRow(H + 120, team, "k2", "test", "ok", 5, 0),
        UsageRow(H + 3600 + 60, team, "k1", "live", "ok", 6, 6),
        UsageRow(H + DAY + 60, team, "k1", "live", "ok", 7, 7),
        UsageRow(H + 2 * DAY + 60, team, "k1", "live", "ok", 8, 8),  # after the horizon
        UsageRow(H + 60, other, "k9", "live", "ok", 9, 9),
    ]


async def test_minutes_before_the_horizon_fold_into_their_hours(db: Backend) -> None:
    team, other = (await db.create_team("a")).id, (await db.create_team("b")).id
    await db.add_usage(rows(team, other))
    days = await db.usage_buckets(team, H, H + 3 * DAY, DAY, None)
    hours = await db.usage_buckets(team, H, H + 3 * DAY, 3600, "k1")
    # The horizon is rounded down to a whole hour: H + 2 days.
    assert await db.roll_up_usage(H + 2 * DAY + 1800) == 7
    assert await db.usage_buckets(team, H, H + 3 * DAY, 60, None) == [
        UsageBucket(H, "ok", 11, 6),
        UsageBucket(H, "rate_limited", 4, 0),
        UsageBucket(H + 3600, "ok", 6, 6),
        UsageBucket(H + DAY, "ok", 7, 7),
        UsageBucket(H + 2 * DAY + 60, "ok", 8, 8),
    ]
    # Reports by hour or day from a whole hour read the same as before.
    assert await db.usage_buckets(team, H, H + 3 * DAY, DAY, None) == days
    assert await db.usage_buckets(team, H, H + 3 * DAY, 3600, "k1") == hours
    assert await db.usage_buckets(other, H, H + DAY, 60, None) == [UsageBucket(H, "ok", 9, 9)]
    assert await db.roll_up_usage(H + 2 * DAY) == 0
    # A later pass folds what crossed the horizon since.
    assert await db.roll_up_usage(H + 3 * DAY) == 1
    assert await db.usage_buckets(team, H + 2 * DAY, H + 3 * DAY, 60, None) == [
        UsageBucket(H + 2 * DAY, "ok", 8, 8)
    ]


async def test_two_replicas_folding_at_once_count_every_request_once(backends: Backends) -> None:
    one, two = await backends.open(), await backends.open()
    team = (await one.create_team("a")).id
    minutes = [UsageRow(H + 60 * m, team, "k1", "live", "ok", 1, 1) for m in range(3 * 24 * 60)]
    await one.add_usage(minutes)
    folded = await asyncio.gather(one.roll_up_usage(H + 3 * DAY), two.roll_up_usage(H + 3 * DAY))
    # Every minute row but the 72 hours' own went once, whichever replica took it.
    assert sum(folded) == len(minutes) - 72
    hours = await one.usage_buckets(team, H, H + 3 * DAY, 3600, None)
    assert hours == [UsageBucket(H + 3600 * h, "ok", 60, 60) for h in range(72)]
