"""The request log through the admin API: what a request leaves, and who may search it."""

from __future__ import annotations

from typing import Any

from ..conftest import bearer
from .conftest import Admin


async def _setup(admin: Admin) -> tuple[dict[str, Any], dict[str, Any]]:
    await admin.call("POST", "/admin/v1/teams", {"name": "t"}, expect=201)
    await admin.call("POST", "/admin/v1/teams/t/credits", {"amount": 2, "reason": "x"}, expect=200)
    one = await admin.call("POST", "/admin/v1/teams/t/keys", {"name": "one"}, expect=201)
    two = await admin.call("POST", "/admin/v1/teams/t/keys", {"name": "two"}, expect=201)
    return one, two


async def _send(admin: Admin, key: str, path: str = "/api/v1/assess", **headers: str) -> int:
    resp = await admin.harness.client.post(path, headers={**bearer(key), **headers})
    return resp.status


async def _search(admin: Admin, query: str = "", **kw: Any) -> Any:
    return await admin.call("GET", f"/admin/v1/teams/t/requests{query}", **kw)


async def test_each_request_with_a_known_key_is_logged_newest_first(admin: Admin) -> None:
    one, two = await _setup(admin)
    statuses = [
        await _send(admin, one["key"], "/api/v1/assess?token=secret", **{"User-Agent": "probe/1"}),
        await _send(admin, two["key"], **{"X-Forwarded-For": "203.0.113.9"}),
        await _send(admin, one["key"]),
    ]
    assert statuses == [200, 200, 402]
    await _send(admin, "ckiq_live_" + "A" * 40)  # no such key: counted as an auth failure only
    assert admin.harness.gateway.request_log is not None
    await admin.harness.gateway.request_log.flush()

    page = await _search(admin, expect=200)
    rows = page["items"]
    assert [(r["key_id"], r["status"], r["outcome"], r["credits"]) for r in rows] == [
        (one["id"], 402, "insufficient_credits", 0),
        (two["id"], 200, "ok", 1),
        (one["id"], 200, "ok", 1),
    ]
    first = rows[-1]
    assert first["path"] == "/api/v1/assess"  # the query string is never kept
    assert first["user_agent"] == "probe/1" and first["method"] == "POST"
    assert first["route"] == "/api/v1/assess" and first["environment"] == "live"
    assert first["key_prefix"] == one["prefix"] and first["client_ip"] == "127.0.0.1"
    assert first["time"].endswith("Z") and first["duration_ms"] >= 0
    assert "secret" not in str(page) and one["key"] not in str(page)
    assert page["next_cursor"] is None

    by_key = await _search(admin, f"?key_id={two['id']}", expect=200)
    assert [r["key_id"] for r in by_key["items"]] == [two["id"]]
    assert [r["status"] for r in (await _search(admin, "?status=4xx", expect=200))["items"]] == [
        402
    ]
    assert (await _search(admin, "?status=200&outcome=ok", expect=200))["items"][0]["key_id"] == (
        two["id"]
    )
    assert len((await _search(admin, "?client_ip=127.0.0.0/8", expect=200))["items"]) == 3
    assert (await _search(admin, "?client_ip=10.0.0.0/8", expect=200))["items"] == []


async def test_pages_follow_the_cursor(admin: Admin) -> None:
    one, _ = await _setup(admin)
    for _ in range(5):
        await _send(admin, one["key"])
    assert admin.harness.gateway.request_log is not None
    await admin.harness.gateway.request_log.flush()
    seen: list[int] = []
    query = "?limit=2"
    while True:
        page = await _search(admin, query, expect=200)
        seen += [r["id"] for r in page["items"]]
        if page["next_cursor"] is None:
            break
        query = f"?limit=2&cursor={page['next_cursor']}"
    assert len(seen) == 5 and seen == sorted(seen, reverse=True)


async def test_a_team_token_searches_its_own_team_only(admin: Admin) -> None:
    one, _ = await _setup(admin)
    await admin.call("POST", "/admin/v1/teams", {"name": "other"}, expect=201)
    token = await admin.call("POST", "/admin/v1/teams/t/tokens", {"name": "ci"}, expect=201)
    theirs = await admin.call("POST", "/admin/v1/teams/other/tokens", {"name": "ci"}, expect=201)
    await _send(admin, one["key"])
    assert admin.harness.gateway.request_log is not None
    await admin.harness.gateway.request_log.flush()
    own = await _search(admin, token=token["token"], expect=200)
    assert len(own["items"]) == 1
    status, body = await _search(admin, token=theirs["token"])
    missing, _ = await admin.call("GET", "/admin/v1/teams/nobody/requests", token=theirs["token"])
    assert (status, missing) == (404, 404)
    assert body["error"] == "No such team"


async def test_bad_filters_are_422_naming_the_field(admin: Admin) -> None:
    await _setup(admin)
    for query, field in [
        ("?status=4x", "status"),
        ("?status=600", "status"),
        ("?client_ip=10.0.0.300", "client_ip"),
        ("?client_ip=10.0.0.0/40", "client_ip"),
        ("?path_prefix=api", "path_prefix"),
        ("?cursor=%C2%B2", "cursor"),
        ("?from=2026-01-02T00:00:00Z&to=2026-01-01T00:00:00Z", "from"),
        ("?limit=0", "limit"),
        ("?outcome=%00", "outcome"),
    ]:
        status, body = await _search(admin, query)
        assert status in (400, 422), (query, status, body)
        assert [d["field"] for d in body["details"]] == [field], (query, body)
