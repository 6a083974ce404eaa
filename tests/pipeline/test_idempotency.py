"""Idempotency-Key on charged routes (contract §1): replayed, never charged twice."""

from __future__ import annotations

import asyncio

from ..conftest import Harness, MakeGateway, bearer


def with_key(key: str, idempotency_key: str) -> dict[str, str]:
    return {**bearer(key), "Idempotency-Key": idempotency_key}


async def test_a_retry_is_replayed_and_charged_once(gw: Harness) -> None:
    key = await gw.key(credits=5)
    gw.upstream.body = b'{"score": 91}'
    first = await gw.client.post(
        "/api/v1/assess", headers=with_key(key, "order-1"), data=b'{"a":1}'
    )
    assert first.status == 200 and await first.read() == b'{"score": 91}'
    assert "Idempotent-Replayed" not in first.headers
    await gw.settle()
    gw.upstream.body = b'{"score": 0}'  # whatever the upstream would say now, it is not asked
    for _ in range(3):
        again = await gw.client.post(
            "/api/v1/assess", headers=with_key(key, "order-1"), data=b'{"a":1}'
        )
        assert again.status == 200
        assert await again.read() == b'{"score": 91}'
        assert again.headers["Idempotent-Replayed"] == "true"
        assert again.headers["Content-Type"].startswith("application/json")
        assert "X-Request-Id" in again.headers and "RateLimit" in again.headers
    assert len(gw.upstream.requests) == 1
    await gw.settle()
    assert await gw.balance() == 4
    await gw.assert_reconciled()


async def test_a_different_request_under_a_used_key_is_422(gw: Harness) -> None:
    key = await gw.key(credits=5)
    assert (
        await gw.client.post("/api/v1/assess", headers=with_key(key, "k"), data=b"one")
    ).status == 200
    await gw.settle()
    other_body = await gw.client.post("/api/v1/assess", headers=with_key(key, "k"), data=b"two")
    assert other_body.status == 422 and "different request" in (await other_body.json())["error"]
    other_path = await gw.client.post("/api/v1/assess/x", headers=with_key(key, "k"), data=b"one")
    assert other_path.status == 422
    assert len(gw.upstream.requests) == 1
    await gw.settle()
    assert await gw.balance() == 4


async def test_a_retry_while_the_first_is_in_flight_is_409(gw: Harness) -> None:
    key = await gw.key(credits=5)
    gw.upstream.delay = 0.5
    first = asyncio.create_task(gw.client.post("/api/v1/assess", headers=with_key(key, "slow")))
    await asyncio.sleep(0.2)
    racing = await gw.client.post("/api/v1/assess", headers=with_key(key, "slow"))
    assert racing.status == 409 and "in progress" in (await racing.json())["error"]
    assert (await first).status == 200
    assert len(gw.upstream.requests) == 1
    await gw.settle()
    assert await gw.balance() == 4


async def test_refusals_are_not_stored(gw: Harness) -> None:
    key = await gw.key(credits=0)
    refused = await gw.client.post("/api/v1/assess", headers=with_key(key, "retry-me"))
    assert refused.status == 402
    team = await gw.gateway.management.team("acme")
    await gw.gateway.management.grant(team.id, 1, "top up")
    retried = await gw.client.post("/api/v1/assess", headers=with_key(key, "retry-me"))
    assert retried.status == 200 and "Idempotent-Replayed" not in retried.headers


async def test_a_failed_connection_is_judged_afresh(gw: Harness) -> None:
    key = await gw.key(credits=2)
    gw.upstream.reset = True
    assert (await gw.client.post("/api/v1/assess", headers=with_key(key, "flaky"))).status == 502
    await gw.settle()
    gw.upstream.reset = False
    retried = await gw.client.post("/api/v1/assess", headers=with_key(key, "flaky"))
    assert retried.status == 200 and "Idempotent-Replayed" not in retried.headers
    await gw.settle()
    assert await gw.balance() == 1
    await gw.assert_reconciled()


async def test_an_upstream_error_is_replayed_and_refunded_once(gw: Harness) -> None:
    key = await gw.key(credits=2)
    gw.upstream.status, gw.upstream.body = 500, b'{"error": "model down"}'
    assert (await gw.client.post("/api/v1/assess", headers=with_key(key, "e"))).status == 500
    await gw.settle()
    again = await gw.client.post("/api/v1/assess", headers=with_key(key, "e"))
    assert again.status == 500 and again.headers["Idempotent-Replayed"] == "true"
    assert await again.read() == b'{"error": "model down"}'
    await gw.settle()
    assert await gw.balance() == 2 and len(gw.upstream.requests) == 1


async def test_an_answer_over_the_replay_cap_is_not_replayed(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(idempotency={"replay_cap_bytes": 10})
    key = await gw.key(credits=5)
    gw.upstream.body = b'{"long": "' + b"x" * 100 + b'"}'
    assert (await gw.client.post("/api/v1/assess", headers=with_key(key, "big"))).status == 200
    await gw.settle()
    again = await gw.client.post("/api/v1/assess", headers=with_key(key, "big"))
    assert again.status == 409 and "too large" in (await again.json())["error"]
    await gw.settle()
    assert await gw.balance() == 4 and len(gw.upstream.requests) == 1


async def test_a_replay_counts_against_the_rate_limit(gw: Harness) -> None:
    key = await gw.key(credits=5, rate_limit=1)
    assert (await gw.client.post("/api/v1/assess", headers=with_key(key, "r"))).status == 200
    await gw.settle()
    assert (await gw.client.post("/api/v1/assess", headers=with_key(key, "r"))).status == 429


async def test_keys_are_scoped_to_the_team(gw: Harness) -> None:
    one = await gw.key(team="one", credits=1)
    two = await gw.key(team="two", credits=1)
    assert (await gw.client.post("/api/v1/assess", headers=with_key(one, "same"))).status == 200
    await gw.settle()
    resp = await gw.client.post("/api/v1/assess", headers=with_key(two, "same"))
    assert resp.status == 200 and "Idempotent-Replayed" not in resp.headers
    assert len(gw.upstream.requests) == 2


async def test_unlimited_test_keys_are_idempotent_too(gw: Harness) -> None:
    key = await gw.key(team="sandbox", credits=0, environment="test")
    assert (await gw.client.post("/api/v1/assess", headers=with_key(key, "t"))).status == 200
    await gw.settle()
    again = await gw.client.post("/api/v1/assess", headers=with_key(key, "t"))
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert len(gw.upstream.requests) == 1


async def test_a_malformed_key_is_400(gw: Harness) -> None:
    key = await gw.key(credits=1)
    for bad in ("", "has space", "x" * 256, "naïve"):
        resp = await gw.client.post("/api/v1/assess", headers=with_key(key, bad))
        assert resp.status == 400, bad
    assert gw.upstream.requests == []
    await gw.settle()
    assert await gw.balance() == 1
