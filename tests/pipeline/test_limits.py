"""Rate limits through the pipeline: 429 body, Retry-After and the IETF headers."""

from ..conftest import Harness, MakeGateway, bearer


async def test_spent_60_per_minute_key_gets_retry_after_1(gw: Harness) -> None:
    key = await gw.key(credits=100)
    for i in range(60):
        resp = await gw.client.get("/api/v1/credits", headers=bearer(key))
        assert resp.status == 200
        assert resp.headers["X-RateLimit-Remaining"] == str(59 - i)
    resp = await gw.client.post("/api/v1/assess", headers=bearer(key))
    assert resp.status == 429
    assert await resp.json() == {"error": "Rate limit exceeded", "retry_after": 1, "limit": 60}
    assert resp.headers["Retry-After"] == "1"
    assert resp.headers["RateLimit-Policy"] == '"default";q=60;w=60'
    assert resp.headers["RateLimit"] == '"default";r=0;t=1'
    assert resp.headers["X-RateLimit-Limit"] == "60"
    assert resp.headers["X-RateLimit-Remaining"] == "0"
    assert resp.headers["X-RateLimit-Reset"] == "60"
    assert await gw.balance() == 100  # a refused request never touches credits


async def test_one_per_minute_key_gets_retry_after_60(gw: Harness) -> None:
    key = await gw.key(rate_limit=1)
    first = await gw.client.post("/api/v1/assess", headers=bearer(key))
    assert first.status == 200
    assert first.headers["RateLimit-Policy"] == '"default";q=1;w=60'
    assert first.headers["RateLimit"] == '"default";r=0;t=60'
    resp = await gw.client.post("/api/v1/assess", headers=bearer(key))
    assert resp.status == 429
    assert await resp.json() == {"error": "Rate limit exceeded", "retry_after": 60, "limit": 1}
    assert resp.headers["Retry-After"] == "60"
    assert len(gw.upstream.requests) == 1


async def test_success_carries_the_keys_real_values(gw: Harness) -> None:
    key = await gw.key(rate_limit=5)
    resp = await gw.client.post("/api/v1/assess", headers=bearer(key))
    assert resp.status == 200
    assert resp.headers["RateLimit"] == '"default";r=4;t=0'
    assert resp.headers["X-RateLimit-Limit"] == "5"
    assert resp.headers["X-RateLimit-Remaining"] == "4"
    assert resp.headers["X-RateLimit-Reset"] == "12"


async def test_team_limit_is_all_or_nothing(gw: Harness) -> None:
    m = gw.gateway.management
    team = await m.create_team("shared", rate_limit_per_minute=2)
    await m.grant(team.id, 10, "t")
    a = (await m.create_key(team.id, "a")).secret
    b = (await m.create_key(team.id, "b")).secret
    assert (await gw.client.post("/api/v1/assess", headers=bearer(a))).status == 200
    assert (await gw.client.post("/api/v1/assess", headers=bearer(b))).status == 200
    refused = await gw.client.post("/api/v1/assess", headers=bearer(a))
    assert refused.status == 429
    assert await refused.json() == {"error": "Rate limit exceeded", "retry_after": 30, "limit": 2}
    # Key a's own bucket was not charged by the refusal: 58 of 60 remain after 1 use.
    assert refused.headers["X-RateLimit-Remaining"] == "59"


async def test_default_limit_from_config(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(rate_limit={"per_minute": 2})
    key = await gw.key()
    statuses = [
        (await gw.client.get("/api/v1/credits", headers=bearer(key))).status for _ in range(3)
    ]
    assert statuses == [200, 200, 429]
