"""The plan endpoints (contract §5) on both stores: set refills once, read, clear, refusals."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.listeners import create_admin_app
from tests.admin.conftest import Admin
from tests.conftest import MakeGateway
from tests.storage.conftest import Databases, postgres_admin_dsn, postgres_template

__all__ = ["postgres_admin_dsn", "postgres_template"]


@pytest.fixture(params=["sqlite", "postgres"])
async def admin_on(
    request: pytest.FixtureRequest, make_gateway: MakeGateway, aiohttp_client: Any
) -> AsyncIterator[Admin]:
    if request.param == "sqlite":
        harness = await make_gateway()
        yield Admin(await aiohttp_client(create_admin_app(harness.gateway)), harness)
        return
    dbs = Databases(
        request.getfixturevalue("postgres_admin_dsn"),
        request.getfixturevalue("postgres_template"),
    )
    try:
        harness = await make_gateway(storage=await dbs.migrated())
        try:
            yield Admin(await aiohttp_client(create_admin_app(harness.gateway)), harness)
        finally:
            await harness.client.close()
    finally:
        await dbs.drop_all()


async def test_setting_a_plan_refills_once_and_reads_back(admin_on: Admin) -> None:
    admin = admin_on
    team = await admin.call("POST", "/admin/v1/teams", {"name": "t"}, expect=201)
    body = {"allowance": 500, "period": "month", "anchor_day": 5, "rollover": "carry",
            "max_balance": 2000}  # fmt: skip
    shown = await admin.call("PUT", "/admin/v1/teams/t/plan", body, expect=200)
    assert shown["team_id"] == team["id"] and shown["allowance"] == 500
    assert shown["period"] == "month" and shown["anchor_day"] == 5
    assert shown["next_refill_at"].endswith("T00:00:00Z") and shown["next_refill_at"][8:10] == "05"
    # Set again in the same period: the plan changes, the period is not refilled twice.
    await admin.call("PUT", "/admin/v1/teams/t/plan", {**body, "allowance": 700}, expect=200)
    credits = await admin.call("GET", "/admin/v1/teams/t/credits", expect=200)
    assert credits["balances"]["live"] == 500
    assert await admin.harness.gateway.management.refill_due() == []
    assert (await admin.call("GET", "/admin/v1/teams/t/plan", expect=200))["allowance"] == 700
    await admin.call("GET", "/admin/v1/teams/t/plan?environment=test", expect=404)
    await admin.call("GET", "/admin/v1/teams/t/plan?environment=", expect=422)
    audit = await admin.call("GET", "/admin/v1/audit?team=t", expect=200)
    assert [e["action"] for e in audit["items"]].count("plan.set") == 2
    cleared = await admin.call("DELETE", "/admin/v1/teams/t/plan", expect=200)
    assert cleared["allowance"] == 700
    await admin.call("DELETE", "/admin/v1/teams/t/plan", expect=404)
    await admin.call("GET", "/admin/v1/teams/t/plan", expect=404)
    await admin.harness.assert_reconciled()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"allowance": 0, "period": "day"}, "allowance"),
        ({"allowance": 5, "period": "year"}, "period"),
        ({"allowance": 5, "period": "week", "anchor_day": 8}, "anchor_day"),
        ({"allowance": 5, "period": "day", "anchor_day": 2}, "anchor_day"),
        ({"allowance": 5, "period": "day", "max_balance": 0}, "max_balance"),
        ({"allowance": 5, "period": "day", "rollover": "keep"}, "rollover"),
        ({"allowance": 5, "period": "day", "environment": "prod"}, "environment"),
        ({"period": "day"}, "allowance"),
        ({"allowance": 5, "period": "day", "colour": "red"}, "colour"),
    ],
)
async def test_bad_plans_are_refused_naming_the_field(
    admin: Admin, body: dict[str, Any], field: str
) -> None:
    await admin.call("POST", "/admin/v1/teams", {"name": "t"}, expect=201)
    refused = await admin.call("PUT", "/admin/v1/teams/t/plan", body, expect=422)
    assert field in [d["field"] for d in refused["details"]]
    await admin.call("PUT", "/admin/v1/teams/nobody/plan", {"allowance": 5, "period": "day"},
                     expect=404)  # fmt: skip


async def test_a_team_token_reads_its_plan_but_may_not_set_one(admin: Admin) -> None:
    await admin.call("POST", "/admin/v1/teams", {"name": "t"}, expect=201)
    token = await admin.call("POST", "/admin/v1/teams/t/tokens", {"name": "n"}, expect=201)
    secret = token["token"]
    plan = {"allowance": 5, "period": "week"}
    await admin.call("PUT", "/admin/v1/teams/t/plan", plan, token=secret, expect=403)
    await admin.call("PUT", "/admin/v1/teams/t/plan", plan, expect=200)
    shown = await admin.call("GET", "/admin/v1/teams/t/plan", token=secret, expect=200)
    assert shown["allowance"] == 5 and shown["anchor_day"] == 1
    await admin.call("DELETE", "/admin/v1/teams/t/plan", token=secret, expect=403)
