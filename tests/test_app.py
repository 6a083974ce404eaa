"""The gateway's own background jobs, run by a started gateway on its schedule."""

from __future__ import annotations

import asyncio
import time

from gateway.caps import cap_periods_at
from gateway.storage import ReserveRequest

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
