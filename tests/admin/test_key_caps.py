"""Per-key spend caps through the pipeline: the contract's 402 with what the key may still
spend, X-Credits-Remaining saying the same, refunds giving the cap back, live changes."""

from __future__ import annotations

import asyncio

import pytest

from ..conftest import Harness, bearer
from .conftest import Admin


@pytest.fixture
def gw(admin: Admin) -> Harness:
    return admin.harness


async def key_id(gw: Harness, team: str = "acme") -> str:
    [key] = await gw.gateway.management.keys(team)
    return key.id


async def cap(admin: Admin, **caps: int | None) -> None:
    kid = await key_id(admin.harness)
    body = await admin.call("PATCH", f"/admin/v1/keys/{kid}", caps, expect=200)
    for field, value in caps.items():
        assert body[field] == value


async def test_a_capped_key_is_refused_at_its_cap_with_what_it_may_still_spend(
    gw: Harness, admin: Admin
) -> None:
    secret = await gw.key(credits=100)
    await cap(admin, credit_cap_per_day=3)
    remaining = []
    for _ in range(3):
        resp = await gw.client.post("/api/v1/assess", headers=bearer(secret), json={})
        assert resp.status == 200
        remaining.append(resp.headers["X-Credits-Remaining"])
    # The team has 97 left; this key may spend 2, 1, 0 more today.
    assert remaining == ["2", "1", "0"]
    refused = await gw.client.post("/api/v1/assess", headers=bearer(secret), json={})
    assert refused.status == 402
    assert await refused.json() == {
        "error": "Insufficient credits",
        "credits_required": 1,
        "credits_available": 0,
    }
    assert refused.headers["X-Credits-Remaining"] == "0"
    assert len(gw.upstream.requests) == 3
    await gw.settle()
    assert await gw.balance() == 97
    await gw.assert_reconciled()


async def test_a_failed_request_gives_its_credit_back_to_the_cap(gw: Harness, admin: Admin) -> None:
    secret = await gw.key(credits=100)
    await cap(admin, credit_cap_per_day=1)
    gw.upstream.status = 500
    assert (await gw.client.post("/api/v1/assess", headers=bearer(secret))).status == 500
    await gw.settle()
    gw.upstream.status = 200
    ok = await gw.client.post("/api/v1/assess", headers=bearer(secret))
    assert ok.status == 200 and ok.headers["X-Credits-Remaining"] == "0"
    assert (await gw.client.post("/api/v1/assess", headers=bearer(secret))).status == 402
    await gw.assert_reconciled()


async def test_raising_or_clearing_a_cap_takes_effect_at_once(gw: Harness, admin: Admin) -> None:
    secret = await gw.key(credits=100)
    await cap(admin, credit_cap_per_month=1)
    assert (await gw.client.post("/api/v1/assess", headers=bearer(secret))).status == 200
    assert (await gw.client.post("/api/v1/assess", headers=bearer(secret))).status == 402
    await cap(admin, credit_cap_per_month=2)
    assert (await gw.client.post("/api/v1/assess", headers=bearer(secret))).status == 200
    await cap(admin, credit_cap_per_month=None)
    resp = await gw.client.post("/api/v1/assess", headers=bearer(secret))
    assert resp.status == 200 and resp.headers["X-Credits-Remaining"] == "97"
    await gw.assert_reconciled()


async def test_concurrent_requests_never_pass_the_cap(gw: Harness, admin: Admin) -> None:
    secret = await gw.key(credits=1000)
    await cap(admin, credit_cap_per_day=10)
    answers = await asyncio.gather(
        *(gw.client.post("/api/v1/assess", headers=bearer(secret)) for _ in range(30))
    )
    statuses = sorted(r.status for r in answers)
    assert statuses == [200] * 10 + [402] * 20
    await gw.settle()
    assert await gw.balance() == 990
    await gw.assert_reconciled()


async def test_bad_caps_are_refused_naming_the_field(gw: Harness, admin: Admin) -> None:
    await gw.key(credits=1)
    kid = await key_id(gw)
    for body, field in (
        ({"credit_cap_per_day": 0}, "credit_cap_per_day"),
        ({"credit_cap_per_month": "ten"}, "credit_cap_per_month"),
        ({"quota_per_day": True}, "quota_per_day"),
        ({"quota_per_month": -5}, "quota_per_month"),
    ):
        status, answer = await admin.call("PATCH", f"/admin/v1/keys/{kid}", body)
        assert status == 422, body
        assert field in str(answer)
    listed = await admin.call("GET", "/admin/v1/teams/acme/keys", expect=200)
    [key] = listed["items"]
    assert key["credit_cap_per_day"] is None and key["quota_per_month"] is None


async def test_a_key_created_with_caps_is_capped_from_its_first_request(
    gw: Harness, admin: Admin
) -> None:
    await admin.call("POST", "/admin/v1/teams", {"name": "acme"}, expect=201)
    await admin.call(
        "POST", "/admin/v1/teams/acme/credits", {"amount": 10, "reason": "t"}, expect=200
    )
    made = await admin.call(
        "POST",
        "/admin/v1/teams/acme/keys",
        {"name": "staging", "credit_cap_per_day": 1, "quota_per_month": 5},
        expect=201,
    )
    assert made["credit_cap_per_day"] == 1 and made["quota_per_month"] == 5
    assert (await gw.client.post("/api/v1/assess", headers=bearer(made["key"]))).status == 200
    assert (await gw.client.post("/api/v1/assess", headers=bearer(made["key"]))).status == 402
    status, answer = await admin.call(
        "POST", "/admin/v1/teams/acme/keys", {"name": "x", "credit_cap_per_month": 0}
    )
    assert status == 422 and "credit_cap_per_month" in str(answer)


async def test_a_rotated_key_keeps_its_caps_and_quotas(gw: Harness, admin: Admin) -> None:
    await gw.key(credits=100)
    await cap(admin, credit_cap_per_day=2, quota_per_day=50)
    rotated = await admin.call(
        "POST", f"/admin/v1/keys/{await key_id(gw)}/rotate", {"grace_seconds": 0}, expect=201
    )
    assert rotated["credit_cap_per_day"] == 2 and rotated["quota_per_day"] == 50
    statuses = [
        (await gw.client.post("/api/v1/assess", headers=bearer(rotated["key"]))).status
        for _ in range(3)
    ]
    assert statuses == [200, 200, 402]
    await gw.assert_reconciled()
