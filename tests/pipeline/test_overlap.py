"""On Redis + PostgreSQL the reserve goes out while the limiter decides, and never costs a charge.

Real Redis, real PostgreSQL, a real upstream. Redis is held still with
``CLIENT PAUSE`` to see what the gateway does while a decision is out.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest
import redis.asyncio

from tests.services import redis_url
from tests.storage.conftest import databases, postgres_admin_dsn, postgres_dsn, postgres_template

from ..conftest import Harness, MakeGateway, bearer

__all__ = ["databases", "postgres_admin_dsn", "postgres_dsn", "postgres_template"]

ASSESS = "/api/v1/assess"


@pytest.fixture
async def redis_admin() -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.from_url(redis_url())
    yield client
    await client.execute_command("CLIENT", "UNPAUSE")
    await client.aclose()


async def _gateway(make_gateway: MakeGateway, postgres_dsn: str) -> Harness:
    # A limiter timeout well past the pauses below: the decision waits, it does not fall back.
    return await make_gateway(
        storage=postgres_dsn, limiter={"url": redis_url(), "timeout_seconds": 5}
    )


async def _reservations(dsn: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(
            "SELECT id, resolution, charged FROM reservations ORDER BY created_at"
        )
    finally:
        await conn.close()


async def test_the_reserve_is_in_the_database_before_the_limiter_answers(
    make_gateway: MakeGateway, postgres_dsn: str, redis_admin: redis.asyncio.Redis
) -> None:
    gw = await _gateway(make_gateway, postgres_dsn)
    key = await gw.key(credits=5)
    await redis_admin.execute_command("CLIENT", "PAUSE", 4000, "ALL")
    sending = asyncio.create_task(gw.client.post(ASSESS, headers=bearer(key), data=b"{}"))
    seen: list[asyncpg.Record] = []
    for _ in range(100):  # at most ~3 s: well inside the pause
        seen = await _reservations(postgres_dsn)
        if seen:
            break
        await asyncio.sleep(0.01)
    assert not sending.done(), "the limiter answered while Redis was paused"
    assert len(seen) == 1 and seen[0]["resolution"] is None  # reserved, not yet resolved
    await redis_admin.execute_command("CLIENT", "UNPAUSE")
    response = await sending
    assert response.status == 200
    assert response.headers["X-Credits-Remaining"] == "4"
    await gw.assert_reconciled()
    assert await gw.balance() == 4
    assert [(r["resolution"], r["charged"]) for r in await _reservations(postgres_dsn)] == [
        ("post", 1)
    ]


async def test_a_key_past_its_limit_costs_the_ledger_nothing(
    make_gateway: MakeGateway, postgres_dsn: str
) -> None:
    gw = await _gateway(make_gateway, postgres_dsn)
    key = await gw.key(credits=50, rate_limit=2)
    statuses = []
    for _ in range(12):
        response = await gw.client.post(ASSESS, headers=bearer(key), data=b"{}")
        statuses.append(response.status)
    assert statuses == [200, 200] + [429] * 10
    await gw.assert_reconciled()
    # Only the two admitted requests ever reserved: once the limiter said "wait",
    # the key's requests were decided before anything touched the ledger.
    assert [(r["resolution"], r["charged"]) for r in await _reservations(postgres_dsn)] == [
        ("post", 1),
        ("post", 1),
    ]
    assert await gw.balance() == 48


async def test_a_team_limit_tighter_than_the_key_costs_the_ledger_nothing(
    make_gateway: MakeGateway, postgres_dsn: str
) -> None:
    # The key could send 60 a minute, its team only 3: after the first decision
    # the room to reserve ahead is the team's, so the requests the team's limit
    # refuses never reserve (held credits could otherwise turn an admitted
    # request of a team with a low balance into a 402).
    gw = await _gateway(make_gateway, postgres_dsn)
    m = gw.gateway.management
    team = await m.create_team("tight", rate_limit_per_minute=3)
    await m.grant(team.id, 20, "trial")
    key = (await m.create_key(team.id, "k", "live", 60)).secret
    first = await gw.client.post(ASSESS, headers=bearer(key), data=b"{}")
    assert first.status == 200
    answers = await asyncio.gather(
        *(gw.client.post(ASSESS, headers=bearer(key), data=b"{}") for _ in range(10))
    )
    statuses = sorted(a.status for a in answers)
    assert statuses == [200, 200] + [429] * 8
    await gw.assert_reconciled()
    resolutions = [(r["resolution"], r["charged"]) for r in await _reservations(postgres_dsn)]
    assert resolutions == [("post", 1)] * 3  # nothing reserved and voided
    assert await gw.gateway.backend.balance(team.id, "live") == 17


async def test_a_refusal_another_replica_caused_gives_the_credit_back(
    make_gateway: MakeGateway, postgres_dsn: str
) -> None:
    here = await _gateway(make_gateway, postgres_dsn)
    there = await _gateway(make_gateway, postgres_dsn)
    key = await here.key(credits=10, rate_limit=2)
    assert (await here.client.post(ASSESS, headers=bearer(key), data=b"{}")).status == 200
    # The other replica spends the key's last token; this one still thinks it has room.
    assert (await there.client.post(ASSESS, headers=bearer(key), data=b"{}")).status == 200
    refused = await here.client.post(ASSESS, headers=bearer(key), data=b"{}")
    assert refused.status == 429
    assert await refused.json() == {
        "error": "Rate limit exceeded",
        "retry_after": int(refused.headers["Retry-After"]),
        "limit": 2,
    }
    await here.assert_reconciled()
    await there.settle()
    resolutions = [(r["resolution"], r["charged"]) for r in await _reservations(postgres_dsn)]
    # The overlapped reserve of the refused request was voided, not charged.
    assert sorted(resolutions, key=str) == sorted([("post", 1), ("post", 1), ("void", 0)], key=str)
    assert await here.balance() == 8
    # And the replica now knows: its next refused request reserves nothing.
    assert (await here.client.post(ASSESS, headers=bearer(key), data=b"{}")).status == 429
    await here.settle()
    assert len(await _reservations(postgres_dsn)) == 3


async def test_a_client_leaving_while_the_limiter_decides_is_not_charged(
    make_gateway: MakeGateway, postgres_dsn: str, redis_admin: redis.asyncio.Redis
) -> None:
    gw = await _gateway(make_gateway, postgres_dsn)
    key = await gw.key(credits=3)
    await redis_admin.execute_command("CLIENT", "PAUSE", 1000, "ALL")
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(gw.client.post(ASSESS, headers=bearer(key), data=b"{}"), 0.3)
    await redis_admin.execute_command("CLIENT", "UNPAUSE")
    for _ in range(100):  # the void goes out once the reserve's outcome is known
        rows = await _reservations(postgres_dsn)
        if rows and rows[0]["resolution"] is not None:
            break
        await asyncio.sleep(0.02)
    await gw.assert_reconciled()
    assert [(r["resolution"], r["charged"]) for r in await _reservations(postgres_dsn)] == [
        ("void", 0)
    ]
    assert await gw.balance() == 3
    assert gw.upstream.requests == []


async def test_the_memory_limiter_neither_overlaps_nor_remembers_keys(gw: Harness) -> None:
    # In process there is no round trip to hide, so no per-key budget is kept either
    # (it would cost ~50 bytes a key for nothing).
    for _ in range(3):
        key = await gw.key(credits=1)
        assert (await gw.client.post(ASSESS, headers=bearer(key), data=b"{}")).status == 200
    assert gw.gateway.pipeline._limits.ahead is None
