"""Authentication: every 401 of the contract, identical whatever the cause."""

import time

from gateway.keys import checksum, generate_key

from ..conftest import Harness, MakeGateway, bearer

INVALID = {"error": "Invalid API key"}


async def test_missing_header(gw: Harness) -> None:
    resp = await gw.client.post("/api/v1/assess")
    assert resp.status == 401
    assert await resp.json() == {"error": "Missing API key"}
    assert resp.headers["WWW-Authenticate"] == 'Bearer realm="api"'
    assert gw.upstream.requests == []


async def test_every_invalid_credential_looks_the_same(gw: Harness) -> None:
    good = await gw.key()
    body = good[:-6]
    forged = body[:-1] + ("A" if body[-1] != "A" else "B")
    forged += checksum(forged)  # valid checksum, unknown key
    cases = [
        f"Basic {good}",
        "Bearer ",
        "Bearer",
        "Bearer not-a-key",
        f"Bearer {good[:-1]}{'x' if good[-1] != 'x' else 'y'}",  # bad checksum
        f"Bearer {forged}",
        f"Token {good}",
    ]
    for header in cases:
        resp = await gw.client.post("/api/v1/assess", headers={"Authorization": header})
        assert resp.status == 401, header
        assert await resp.json() == INVALID
        assert resp.headers["WWW-Authenticate"] == 'Bearer realm="api", error="invalid_token"'
        assert "RateLimit" not in resp.headers
    assert gw.upstream.requests == []


async def test_scheme_is_case_insensitive(gw: Harness) -> None:
    key = await gw.key()
    resp = await gw.client.post("/api/v1/assess", headers={"Authorization": f"bEaReR {key}"})
    assert resp.status == 200


async def test_revoked_key_refused_on_the_next_request(gw: Harness) -> None:
    key = await gw.key()
    assert (await gw.client.post("/api/v1/assess", headers=bearer(key))).status == 200
    record = (await gw.gateway.management.keys("acme"))[0]
    await gw.gateway.management.revoke_key(record.id)
    # No waiting, no poll: a change made through this process holds at once.
    resp = await gw.client.post("/api/v1/assess", headers=bearer(key))
    assert resp.status == 401 and await resp.json() == INVALID
    assert len(gw.upstream.requests) == 1


async def test_revocation_reaches_the_cache_through_the_change_feed(gw: Harness) -> None:
    import asyncio

    key = await gw.key()
    assert (await gw.client.post("/api/v1/assess", headers=bearer(key))).status == 200
    record = (await gw.gateway.management.keys("acme"))[0]
    await gw.gateway.backend.revoke_key(record.id)
    started = time.monotonic()
    while (await gw.client.post("/api/v1/assess", headers=bearer(key))).status != 401:
        assert time.monotonic() - started < 1.0, "revocation took longer than 1 s"
        await asyncio.sleep(0.02)


async def test_expired_key_is_invalid(gw: Harness) -> None:
    m = gw.gateway.management
    team = await m.create_team("exp")
    await m.grant(team.id, 5, "t")
    created = await m.create_key(team.id, "short", "live", None, time.time() + 0.3)
    assert (await gw.client.post("/api/v1/assess", headers=bearer(created.secret))).status == 200
    import asyncio

    await asyncio.sleep(0.35)
    # Still cached, but expiry is checked on every request.
    resp = await gw.client.post("/api/v1/assess", headers=bearer(created.secret))
    assert resp.status == 401 and await resp.json() == INVALID


async def test_forged_checksums_do_not_evict_real_keys(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(keys={"negative_cache_size": 10, "cache_size": 100})
    key = await gw.key()
    assert (await gw.client.post("/api/v1/assess", headers=bearer(key))).status == 200
    lookups_before = gw.gateway.keys.misses
    for _ in range(50):
        resp = await gw.client.post("/api/v1/assess", headers=bearer(generate_key("live")))
        assert resp.status == 401
    assert gw.gateway.keys.misses == lookups_before + 50
    hits_before = gw.gateway.keys.hits
    assert (await gw.client.post("/api/v1/assess", headers=bearer(key))).status == 200
    assert gw.gateway.keys.hits == hits_before + 1  # the real key is still cached


async def test_test_key_works_at_once_with_unlimited_credits(gw: Harness) -> None:
    key = await gw.key(team="sandbox", credits=0, environment="test")
    resp = await gw.client.post("/api/v1/assess", headers=bearer(key))
    assert resp.status == 200
    assert "X-Credits-Remaining" not in resp.headers
    assert gw.upstream.requests[-1].headers["X-Gateway-Environment"] == "test"
    credits = await gw.client.get("/api/v1/credits", headers=bearer(key))
    assert await credits.json() == {"credits_available": None, "environment": "test"}


async def test_metered_test_environment_spends_test_credits(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(
        credits={"test_environment": "metered", "post_flush_interval_seconds": 0.05}
    )
    key = await gw.key(team="sandbox", credits=1, environment="test")
    first = await gw.client.post("/api/v1/assess", headers=bearer(key))
    assert first.status == 200 and first.headers["X-Credits-Remaining"] == "0"
    second = await gw.client.post("/api/v1/assess", headers=bearer(key))
    assert second.status == 402
    assert await gw.balance("sandbox", "test") == 0
    assert await gw.balance("sandbox", "live") == 0


async def test_unknown_keys_are_throttled_per_client_address(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(security={"unknown_keys_per_minute_per_ip": 5})
    valid = await gw.key(credits=50)
    # Valid keys never spend the budget, however many are looked up.
    for _ in range(10):
        fresh = await gw.key(credits=0)
        assert (await gw.client.get("/api/v1/credits", headers=bearer(fresh))).status == 200
    assert (await gw.client.post("/api/v1/assess", headers=bearer(valid))).status == 200
    for _ in range(5):  # forged keys with valid checksums spend it
        resp = await gw.client.post("/api/v1/assess", headers=bearer(generate_key("live")))
        assert resp.status == 401
    throttled = await gw.client.post("/api/v1/assess", headers=bearer(generate_key("live")))
    assert throttled.status == 429
    body = await throttled.json()
    assert (
        body["error"] == "Rate limit exceeded" and body["limit"] == 5 and body["retry_after"] >= 1
    )
    assert throttled.headers["Retry-After"] == str(body["retry_after"])
    # The key already in memory keeps working from the same address.
    assert (await gw.client.post("/api/v1/assess", headers=bearer(valid))).status == 200
    # Malformed keys never reach the store and are answered 401 as always.
    assert (await gw.client.post("/api/v1/assess", headers=bearer("junk"))).status == 401
