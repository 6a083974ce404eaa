"""Webhooks through the admin API of a running gateway, with a real receiver on loopback:
what management changes and live traffic tell, the address guard, team isolation,
deliveries listed, retried and tested by hand."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient

from gateway.listeners import create_admin_app
from tests.events.test_worker import Receiver, receiver, verify

from ..conftest import MakeGateway, bearer
from .conftest import Admin

__all__ = ["receiver"]

FAST = {"allow_private_addresses": True, "poll_interval_seconds": 0.05,
        "retry_schedule_seconds": [0.1, 0.1]}  # fmt: skip


@pytest.fixture
async def hooked(make_gateway: MakeGateway, aiohttp_client: Any) -> AsyncIterator[Admin]:
    harness = await make_gateway(webhooks=FAST, usage={"flush_interval_seconds": 0.1})
    client: TestClient = await aiohttp_client(create_admin_app(harness.gateway))
    yield Admin(client, harness)


async def types_received(receiver: Receiver, count: int, seconds: float = 10.0) -> list[str]:
    deadline = time.monotonic() + seconds
    while len(receiver.got) < count:
        assert time.monotonic() < deadline, [orjson.loads(b)["type"] for _, b in receiver.got]
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.2)  # and nothing more
    return [orjson.loads(body)["type"] for _, body in receiver.got]


async def test_management_changes_are_told_signed_and_never_with_a_secret(
    hooked: Admin, receiver: Receiver
) -> None:
    team = await hooked.call("POST", "/admin/v1/teams", {"name": "acme"}, expect=201)
    made = await hooked.call("POST", "/admin/v1/teams/acme/webhooks",
                             {"url": receiver.url, "events": ["*"], "description": "ops"},
                             expect=201)  # fmt: skip
    assert made["secret"].startswith("whsec_") and made["team_id"] == team["id"]
    listed = await hooked.call("GET", "/admin/v1/teams/acme/webhooks", expect=200)
    assert [w["id"] for w in listed["items"]] == [made["id"]]
    assert "secret" not in listed["items"][0]
    key = await hooked.call("POST", "/admin/v1/teams/acme/keys", {"name": "k"}, expect=201)
    await hooked.call("POST", "/admin/v1/teams/acme/credits",
                      {"amount": 5, "reason": "top-up"}, expect=200)  # fmt: skip
    await hooked.call("POST", "/admin/v1/keys/revoke-by-secret", {"key": key["key"]}, expect=200)
    got = await types_received(receiver, 3)
    assert got == ["key.created", "credits.granted", "key.leaked"]
    for headers, body in receiver.got:
        assert verify(made["secret"], headers, body)
        assert key["key"].encode() not in body
    created = orjson.loads(receiver.got[0][1])["data"]
    assert (created["key_id"], created["prefix"]) == (key["id"], key["prefix"])


async def test_live_traffic_tells_low_and_exhausted_once_each(
    hooked: Admin, receiver: Receiver
) -> None:
    secret = await hooked.harness.key("acme", credits=5)
    await hooked.call("POST", "/admin/v1/teams/acme/webhooks",
                      {"url": receiver.url, "events": ["credits.low", "credits.exhausted"]},
                      expect=201)  # fmt: skip
    shown = await hooked.call("PUT", "/admin/v1/teams/acme/alerts",
                              {"low_balance_threshold": 3}, expect=200)  # fmt: skip
    assert shown["low_balance_threshold"] == 3 and shown["environment"] == "live"
    statuses = []
    for _ in range(9):  # 5 charged, then 402s
        resp = await hooked.harness.client.post("/api/v1/assess", headers=bearer(secret))
        statuses.append(resp.status)
    assert statuses == [200] * 5 + [402] * 4
    got = await types_received(receiver, 2)
    assert got == ["credits.low", "credits.exhausted"]
    low = orjson.loads(receiver.got[0][1])["data"]
    assert (low["credits_available"], low["threshold"], low["environment"]) == (2, 3, "live")


async def test_private_and_malformed_receivers_are_refused_with_the_field_named(
    admin: Admin,
) -> None:
    await admin.call("POST", "/admin/v1/teams", {"name": "acme"}, expect=201)
    for url, problem in [
        ("http://127.0.0.1:8080/hook", "not a public address"),
        ("http://169.254.169.254/latest/meta-data", "not a public address"),
        ("http://[::ffff:10.0.0.1]/x", "IPv6 receiver by its host name"),
        ("http://0/x", "not public"),
        ("http://100.64.0.1/x", "not a public address"),
        ("http://localhost/x", "not public"),
        ("ftp://example.org/x", "http:// or https://"),
        ("https://user:pw@example.org/x", "user name or password"),
    ]:
        status, body = await admin.call("POST", "/admin/v1/teams/acme/webhooks",
                                        {"url": url, "events": ["*"]})  # fmt: skip
        assert status == 422, (url, body)
        [detail] = body["details"]
        assert detail["field"] == "url" and problem in detail["problem"], (url, detail)
    # (No name is looked up here but localhost's: tests send nothing past loopback.)
    status, body = await admin.call("POST", "/admin/v1/teams/acme/webhooks",
                                    {"url": "http://127.0.0.1:9/x", "events": ["key.bogus"]})
    assert status == 422
    assert {d["field"] for d in body["details"]} == {"url", "events"}
    listed = await admin.call("GET", "/admin/v1/teams/acme/webhooks", expect=200)
    assert listed["items"] == []


async def test_a_team_token_manages_only_its_own_webhooks(
    hooked: Admin, receiver: Receiver
) -> None:
    for name in ("mine", "theirs"):
        await hooked.call("POST", "/admin/v1/teams", {"name": name}, expect=201)
    theirs = await hooked.call("POST", "/admin/v1/teams/theirs/webhooks",
                               {"url": receiver.url, "events": ["*"]}, expect=201)  # fmt: skip
    token = (await hooked.call("POST", "/admin/v1/teams/mine/tokens", {"name": "ci"},
                               expect=201))["token"]  # fmt: skip
    await hooked.call("POST", "/admin/v1/teams/mine/webhooks",
                      {"url": receiver.url, "events": ["*"]}, token=token, expect=201)
    for method, path, body in [
        ("PATCH", f"/admin/v1/webhooks/{theirs['id']}", {"enabled": False}),
        ("DELETE", f"/admin/v1/webhooks/{theirs['id']}", None),
        ("GET", f"/admin/v1/webhooks/{theirs['id']}/deliveries", None),
        ("POST", f"/admin/v1/webhooks/{theirs['id']}/test", {}),
        ("GET", "/admin/v1/teams/theirs/webhooks", None),
    ]:
        status, _ = await hooked.call(method, path, body, token=token)
        assert status == 404, (method, path)


async def test_deliveries_are_listed_tested_and_retried_by_hand(
    hooked: Admin, receiver: Receiver
) -> None:
    await hooked.call("POST", "/admin/v1/teams", {"name": "acme"}, expect=201)
    hook = await hooked.call("POST", "/admin/v1/teams/acme/webhooks",
                             {"url": receiver.url, "events": ["key.created"]}, expect=201)
    receiver.answers = [(500, {}), (500, {}), (500, {})]
    sent = await hooked.call("POST", f"/admin/v1/webhooks/{hook['id']}/test", {}, expect=202)
    assert await types_received(receiver, 3) == ["webhook.test"] * 3
    page = await hooked.call("GET", f"/admin/v1/webhooks/{hook['id']}/deliveries", expect=200)
    assert [(a["state"], a["response_status"]) for a in page["items"]] == [("failed", 500)] * 3
    assert {a["event_id"] for a in page["items"]} == {sent["event_id"]}
    delivery = page["items"][0]["delivery_id"]
    await hooked.call("POST", f"/admin/v1/webhooks/{hook['id']}/deliveries/{delivery}/retry",
                      {}, expect=202)  # fmt: skip
    await types_received(receiver, 4)
    assert {h["webhook-id"] for h, _ in receiver.got} == {sent["event_id"]}
    page = await hooked.call("GET", f"/admin/v1/webhooks/{hook['id']}/deliveries?limit=2",
                             expect=200)  # fmt: skip
    assert page["items"][0]["state"] == "delivered" and page["next_cursor"] is not None
    status, body = await hooked.call("POST", f"/admin/v1/webhooks/{hook['id']}/deliveries/"
                                     "whd_0123/retry", {})  # fmt: skip
    assert status == 404 and body["error"]
    updated = await hooked.call("PATCH", f"/admin/v1/webhooks/{hook['id']}",
                                {"enabled": False, "events": ["*"]}, expect=200)
    assert updated["enabled"] is False and updated["events"] == ["*"]
    await hooked.call("DELETE", f"/admin/v1/webhooks/{hook['id']}", expect=200)
    audit = await hooked.call("GET", "/admin/v1/audit", expect=200)
    actions = [e["action"] for e in audit["items"]]
    assert {"webhook.create", "webhook.retry", "webhook.update", "webhook.delete"} <= set(actions)


async def test_plans_tell_their_refills(hooked: Admin, receiver: Receiver) -> None:
    await hooked.call("POST", "/admin/v1/teams", {"name": "acme"}, expect=201)
    await hooked.call("POST", "/admin/v1/teams/acme/webhooks",
                      {"url": receiver.url, "events": ["credits.refilled"]}, expect=201)
    await hooked.call("PUT", "/admin/v1/teams/acme/plan",
                      {"allowance": 100, "period": "day"}, expect=200)  # fmt: skip
    assert await types_received(receiver, 1) == ["credits.refilled"]
    data = orjson.loads(receiver.got[0][1])["data"]
    assert (data["refilled"], data["expired"], data["environment"]) == (100, 0, "live")
    # Set again in the same period: nothing refilled, nothing told.
    await hooked.call("PUT", "/admin/v1/teams/acme/plan",
                      {"allowance": 200, "period": "day"}, expect=200)  # fmt: skip
    assert await types_received(receiver, 1) == ["credits.refilled"]
