"""Calendar request quotas through the gateway: per key and per team, the contract's 429
with the seconds until the period resets, every policy in RateLimit-Policy, counted by
the store or by Redis, and a new period counting afresh."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from gateway.listeners import create_admin_app
from tests.services import redis_url

from ..conftest import Harness, MakeGateway, bearer
from .conftest import Admin

ASSESS = "/api/v1/assess"


def seconds_to_midnight(offset: float = 0.0) -> float:
    now = datetime.fromtimestamp(time.time() + offset, UTC)
    midnight = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return (midnight - now).total_seconds()


async def admin_for(harness: Harness, aiohttp_client: Any) -> Admin:
    return Admin(await aiohttp_client(create_admin_app(harness.gateway)), harness)


async def key_id(gw: Harness) -> str:
    [key] = await gw.gateway.management.keys("acme")
    return key.id


@pytest.fixture(params=["store", "redis", "redis_down"])
async def counted(
    request: pytest.FixtureRequest, make_gateway: MakeGateway, aiohttp_client: Any
) -> Admin:
    """A gateway whose quotas the store counts (memory limiter, or Redis unreachable) or
    Redis does (in the rate-limit decision)."""
    if request.param == "redis":
        harness = await make_gateway(limiter={"url": redis_url(), "timeout_seconds": 2})
    elif request.param == "redis_down":
        # Nothing listens on port 1 of loopback: the limiter falls back, the store counts.
        harness = await make_gateway(
            limiter={"url": "redis://127.0.0.1:1/0", "timeout_seconds": 0.2}
        )
    else:
        harness = await make_gateway()
    return await admin_for(harness, aiohttp_client)


async def test_a_daily_key_quota_answers_429_until_midnight(counted: Admin) -> None:
    gw = counted.harness
    secret = await gw.key(credits=100)
    await counted.call(
        "PATCH", f"/admin/v1/keys/{await key_id(gw)}", {"quota_per_day": 3}, expect=200
    )
    for n in range(3):
        ok = await gw.client.post(ASSESS, headers=bearer(secret))
        assert ok.status == 200
        policy = ok.headers["RateLimit-Policy"]
        assert policy == '"default";q=60;w=60, "daily";q=3;w=86400'
        assert f'"daily";r={2 - n};t=' in ok.headers["RateLimit"]
    refused = await gw.client.post(ASSESS, headers=bearer(secret))
    assert refused.status == 429
    body = await refused.json()
    assert body["error"] == "Rate limit exceeded" and body["limit"] == 3
    assert abs(body["retry_after"] - seconds_to_midnight()) <= 2
    assert refused.headers["Retry-After"] == str(body["retry_after"])
    assert len(gw.upstream.requests) == 3
    await gw.settle()
    assert await gw.balance() == 97  # the refused request was never charged
    await gw.assert_reconciled()


async def test_a_team_quota_is_shared_by_its_keys_and_only_the_admin_sets_it(
    counted: Admin,
) -> None:
    gw = counted.harness
    first = await gw.key(credits=100)
    second = await gw.key(credits=0)
    token = (await counted.call("POST", "/admin/v1/teams/acme/tokens", {"name": "ci"}, expect=201))[
        "token"
    ]
    status, _ = await counted.call(
        "PATCH", "/admin/v1/teams/acme", {"quota_per_month": 2}, token=token
    )
    assert status == 403
    team = await counted.call("PATCH", "/admin/v1/teams/acme", {"quota_per_month": 2}, expect=200)
    assert team["quota_per_month"] == 2 and team["quota_per_day"] is None
    assert (await gw.client.post(ASSESS, headers=bearer(first))).status == 200
    assert (await gw.client.post(ASSESS, headers=bearer(second))).status == 200
    refused = await gw.client.post(ASSESS, headers=bearer(first))
    assert refused.status == 429 and (await refused.json())["limit"] == 2
    assert '"team-monthly";q=2;w=' in refused.headers["RateLimit-Policy"]
    # Clearing it takes effect at once.
    await counted.call("PATCH", "/admin/v1/teams/acme", {"quota_per_month": None}, expect=200)
    assert (await gw.client.post(ASSESS, headers=bearer(first))).status == 200


async def test_bad_team_quotas_are_refused_naming_the_field(admin: Admin) -> None:
    await admin.call("POST", "/admin/v1/teams", {"name": "acme"}, expect=201)
    for body, field in (
        ({"quota_per_day": 0}, "quota_per_day"),
        ({"quota_per_month": "x"}, "quota_per_month"),
    ):
        status, answer = await admin.call("PATCH", "/admin/v1/teams/acme", body)
        assert status == 422 and field in str(answer), (status, answer)


async def test_a_new_day_counts_afresh(make_gateway: MakeGateway, aiohttp_client: Any) -> None:
    # The calendar's clock is set so that today ends two seconds into the test.
    offset = seconds_to_midnight() - 2.0
    gw = await make_gateway(plans={"clock_offset_seconds": offset})
    admin = await admin_for(gw, aiohttp_client)
    secret = await gw.key(credits=100)
    await admin.call(
        "PATCH", f"/admin/v1/keys/{await key_id(gw)}", {"quota_per_day": 1}, expect=200
    )
    assert (await gw.client.post(ASSESS, headers=bearer(secret))).status == 200
    refused = await gw.client.post(ASSESS, headers=bearer(secret))
    assert refused.status == 429 and (await refused.json())["retry_after"] <= 3
    deadline = time.monotonic() + 6
    while (status := (await gw.client.post(ASSESS, headers=bearer(secret))).status) == 429:
        assert time.monotonic() < deadline, "the new day never started counting afresh"
        await asyncio.sleep(0.2)
    assert status == 200
