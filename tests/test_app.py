"""The gateway's own background jobs, run by a started gateway on its schedule."""

from __future__ import annotations

import asyncio
import time

from gateway.caps import cap_periods_at
from gateway.models import UsageRow
from gateway.storage import ReserveRequest, UsageBucket

from .conftest import MakeGateway

DAY = 86_400


async def test_retention_prunes_key_spend_older_than_the_roll_up_horizon(
    make_gateway: MakeGateway,
) -> None:
    harness = await make_gateway(
        credits={"retention_days": 2, "retention_interval_seconds": 0.05},
    )
    db = harness.gateway.backend
    team = (await db.create_team("spender")).id
    key = (await db.create_key(team, "k", "live", "hash-k", "ckiq_live_abcd", None, None)).id
    await db.update_key(key, {"credit_cap_per_day": 100})
    await db.grant(team, "live", 100, "top-up", "test")
    now = time.time()
    days = {age: cap_periods_at(now - age * DAY) for age in (0, 2, 3)}
    for age, periods in days.items():
        request = ReserveRequest(f"r{age}", team, "live", key, 1, None, periods)
        assert (await db.reserve_batch([request]))[0].granted
    # Three days back is past the two-day horizon; two days back is not yet.
    gone = days[3].day
    for _ in range(100):
        if (key, gone) not in await db.key_spending([key], [gone]):
            break
        await asyncio.sleep(0.05)
    kept = [p.day for p in days.values() if p.day != gone]
    assert await db.key_spending([key], [gone, *kept]) == {(key, day): 1 for day in kept}


async def test_retention_folds_usage_minutes_older_than_their_retention_into_hours(
    make_gateway: MakeGateway,
) -> None:
    harness = await make_gateway(
        usage={"minute_retention_days": 1},
        credits={"retention_interval_seconds": 0.05},
    )
    db = harness.gateway.backend
    team = (await db.create_team("counted")).id
    hour = int(time.time() - 2 * DAY) // 3600 * 3600
    recent = int(time.time()) // 60 * 60
    await db.add_usage(
        [
            UsageRow(hour + 60, team, "k", "live", "ok", 2, 2),
            UsageRow(hour + 120, team, "k", "live", "ok", 3, 3),
            UsageRow(recent, team, "k", "live", "ok", 1, 1),
        ]
    )
    for _ in range(100):
        if len(await db.usage_buckets(team, hour, hour + 3600, 60, None)) == 1:
            break
        await asyncio.sleep(0.05)
    assert await db.usage_buckets(team, hour, hour + 3600, 60, None) == [
        UsageBucket(hour, "ok", 5, 5)
    ]
    # Inside the retention: still a row a minute.
    assert await db.usage_buckets(team, recent, recent + 60, 60, None) == [
        UsageBucket(recent, "ok", 1, 1)
    ]
