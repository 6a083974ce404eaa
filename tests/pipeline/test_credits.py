"""Credits through the pipeline: 402, refunds on every failure kind, exact concurrency."""

import asyncio

from ..conftest import Harness, MakeGateway, bearer


async def test_charge_on_success(gw: Harness) -> None:
    key = await gw.key(credits=3)
    resp = await gw.client.post("/api/v1/assess", headers=bearer(key), json={"essay": "x"})
    assert resp.status == 200
    assert resp.headers["X-Credits-Remaining"] == "2"
    assert await resp.json() == {"score": 42}
    await gw.settle()
    assert await gw.balance() == 2
    await gw.assert_reconciled()


async def test_insufficient_credits_body(gw: Harness) -> None:
    key = await gw.key(credits=0)
    resp = await gw.client.post("/api/v1/assess", headers=bearer(key))
    assert resp.status == 402
    assert await resp.json() == {
        "error": "Insufficient credits",
        "credits_required": 1,
        "credits_available": 0,
    }
    assert "RateLimit" in resp.headers
    assert gw.upstream.requests == []


async def test_route_cost_above_balance(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(
        routes=[{"path": "/api/v1/assess", "upstream": "assess", "cost": 5}],
    )
    key = await gw.key(credits=3)
    resp = await gw.client.post("/api/v1/assess", headers=bearer(key))
    assert resp.status == 402
    assert (await resp.json())["credits_required"] == 5
    assert (await resp.json())["credits_available"] == 3


async def test_upstream_500_is_refunded_and_passed_through(gw: Harness) -> None:
    key = await gw.key(credits=1)
    gw.upstream.status = 500
    gw.upstream.body = b'{"error": "model crashed"}'
    resp = await gw.client.post("/api/v1/assess", headers=bearer(key))
    assert resp.status == 500
    assert await resp.read() == b'{"error": "model crashed"}'
    assert "X-Credits-Remaining" not in resp.headers
    await gw.settle()
    assert await gw.balance() == 1
    await gw.assert_reconciled()


async def test_upstream_4xx_is_refunded_by_default(gw: Harness) -> None:
    key = await gw.key(credits=1)
    gw.upstream.status = 422
    assert (await gw.client.post("/api/v1/assess", headers=bearer(key))).status == 422
    await gw.settle()
    assert await gw.balance() == 1


async def test_refund_rules_are_per_route(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(
        routes=[{"path": "/api/v1/assess", "upstream": "assess", "refund_on": ["5xx"]}]
    )
    key = await gw.key(credits=2)
    gw.upstream.status = 422
    assert (await gw.client.post("/api/v1/assess", headers=bearer(key))).status == 422
    await gw.settle()
    assert await gw.balance() == 1  # a 4xx is charged on this route
    await gw.assert_reconciled()


async def test_timeout_504(gw: Harness) -> None:
    key = await gw.key(credits=1)
    gw.upstream.delay = 3.0  # the fixture's upstream timeout is 2 s
    resp = await gw.client.post("/api/v1/assess", headers=bearer(key))
    assert resp.status == 504
    assert await resp.json() == {"error": "Upstream timed out"}
    await gw.settle()
    assert await gw.balance() == 1
    await gw.assert_reconciled()


async def test_connection_refused_is_502_and_refunded(gw: Harness) -> None:
    key = await gw.key(credits=1)
    assert gw.upstream.server is not None
    await gw.upstream.server.close()
    resp = await gw.client.post("/api/v1/assess", headers=bearer(key))
    assert resp.status == 502
    assert await resp.json() == {"error": "Upstream unavailable"}
    await gw.settle()
    assert await gw.balance() == 1
    await gw.assert_reconciled()


async def test_reset_before_answer_is_502_and_refunded(gw: Harness) -> None:
    key = await gw.key(credits=1)
    gw.upstream.reset = True
    resp = await gw.client.post("/api/v1/assess", headers=bearer(key))
    assert resp.status == 502
    await gw.settle()
    assert await gw.balance() == 1


async def test_concurrent_spending_is_exact(gw: Harness) -> None:
    n = 25
    key = await gw.key(credits=n, rate_limit=1000)

    async def one() -> int:
        resp = await gw.client.post("/api/v1/assess", headers=bearer(key))
        await resp.read()
        return resp.status

    statuses = await asyncio.gather(*(one() for _ in range(3 * n)))
    assert statuses.count(200) == n
    assert statuses.count(402) == 2 * n
    assert len(gw.upstream.requests) == n
    await gw.settle()
    assert await gw.balance() == 0
    await gw.assert_reconciled()


async def test_credits_endpoint(gw: Harness) -> None:
    key = await gw.key(credits=7)
    resp = await gw.client.get("/api/v1/credits", headers=bearer(key))
    assert resp.status == 200
    assert await resp.json() == {"credits_available": 7, "environment": "live"}
    assert resp.headers["X-RateLimit-Remaining"] == "59"
    assert (await gw.client.get("/api/v1/credits")).status == 401
    assert (await gw.client.post("/api/v1/credits", headers=bearer(key))).status == 405
    assert gw.upstream.requests == []


async def test_declared_body_over_limit_is_413(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(
        routes=[{"path": "/api/v1/assess", "upstream": "assess", "max_body_bytes": 10}]
    )
    key = await gw.key(credits=1)
    resp = await gw.client.post("/api/v1/assess", headers=bearer(key), data=b"x" * 11)
    assert resp.status == 413
    assert "10 bytes" in (await resp.json())["error"]
    assert gw.upstream.requests == []
    assert await gw.balance() == 1
    ok = await gw.client.post("/api/v1/assess", headers=bearer(key), data=b"x" * 10)
    assert ok.status == 200


async def test_declared_body_over_a_public_routes_limit_is_413(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(
        routes=[{"path": "/public", "upstream": "assess", "auth": False, "max_body_bytes": 10}]
    )
    resp = await gw.client.post("/public", data=b"x" * 11)
    assert resp.status == 413
    assert "10 bytes" in (await resp.json())["error"]
    assert gw.upstream.requests == []
    assert (await gw.client.post("/public", data=b"x" * 10)).status == 200


async def test_upstream_lowers_the_charge(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(routes=[{"path": "/api/v1/assess", "upstream": "assess", "cost": 3}])
    key = await gw.key(credits=10)
    gw.upstream.headers = {"X-Gateway-Charge": "1"}
    resp = await gw.client.post("/api/v1/assess", headers=bearer(key))
    assert resp.status == 200
    assert "X-Gateway-Charge" not in resp.headers
    assert resp.headers["X-Credits-Remaining"] == "9"
    await gw.settle()
    assert await gw.balance() == 9
    await gw.assert_reconciled()


async def test_reservation_ids_sort_in_the_order_requests_were_made(gw: Harness) -> None:
    """Each reservation lands on the primary key index's right edge (gateway/storage/rules.py)."""
    key = await gw.key(credits=5)
    for _ in range(5):
        assert (await gw.client.post("/api/v1/assess", headers=bearer(key))).status == 200
        await asyncio.sleep(0.002)  # ids made in one millisecond need not sort
    await gw.settle()
    team = await gw.gateway.management.team("acme")
    entries = await gw.gateway.backend.ledger_entries(team.id, 10, None)
    made = [e.id for e in reversed(entries) if e.id.startswith("rrsv_")]
    assert len(made) == 5
    assert made == sorted(made)
    # Unlike each other past the time: 80 random bits each.
    assert len({m[17:] for m in made}) == 5 and all(len(m) == 37 for m in made)
