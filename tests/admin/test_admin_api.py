"""The admin API: every route, both token scopes, once-only secrets, rotation, audit."""

from __future__ import annotations

import asyncio
import sqlite3
import time

from ..conftest import bearer
from .conftest import Admin


async def test_admin_token_is_required(admin: Admin) -> None:
    for token in (None, "wrong-token-but-long-enough", ""):
        status, body = await admin.call("GET", "/admin/v1/teams", token=token)
        assert status == 401 and body == {"error": "Unauthorized"}
    # The OpenAPI document is public; everything else is not.
    resp = await admin.client.get("/admin/v1/openapi.json")
    assert resp.status == 200


async def test_team_and_key_lifecycle(admin: Admin) -> None:
    team = await admin.call("POST", "/admin/v1/teams", {"name": "Acme Corp"}, expect=201)
    assert set(team) >= {"id", "name", "created_at"}
    status, dup = await admin.call("POST", "/admin/v1/teams", {"name": "Acme Corp"})
    assert status == 409 and "error" in dup
    listed = await admin.call("GET", "/admin/v1/teams", expect=200)
    assert [t["name"] for t in listed["items"]] == ["Acme Corp"] and listed["next_cursor"] is None

    created = await admin.call(
        "POST", "/admin/v1/teams/Acme Corp/keys", {"name": "production server"}, expect=201
    )
    secret = created["key"]
    assert secret.startswith("ckiq_live_") and created["prefix"] == secret[:14]
    assert set(created) >= {"id", "prefix", "name", "environment", "created_at"}
    keys = await admin.call("GET", f"/admin/v1/teams/{team['id']}/keys", expect=200)
    assert len(keys["items"]) == 1
    listed_key = keys["items"][0]
    assert secret not in str(keys) and "hash" not in str(listed_key)
    for field in (
        "id",
        "name",
        "prefix",
        "environment",
        "rate_limit_per_minute",
        "disabled",
        "created_at",
        "last_used_at",
        "expires_at",
        "revoked_at",
    ):
        assert field in listed_key

    await admin.call(
        "POST",
        f"/admin/v1/teams/{team['id']}/credits",
        {"amount": 5, "reason": "trial"},
        expect=200,
    )
    resp = await admin.harness.client.post("/api/v1/assess", headers=bearer(secret))
    assert resp.status == 200

    revoked = await admin.call("POST", f"/admin/v1/keys/{created['id']}/revoke", expect=200)
    assert revoked["revoked_at"] is not None and revoked["status"] == "revoked"
    await admin.harness.gateway.keys.poll_once()
    resp = await admin.harness.client.post("/api/v1/assess", headers=bearer(secret))
    assert resp.status == 401
    status, _ = await admin.call("POST", f"/admin/v1/keys/{created['id']}/revoke")
    assert status == 409


async def test_patch_key(admin: Admin) -> None:
    await admin.call("POST", "/admin/v1/teams", {"name": "t"}, expect=201)
    created = await admin.call("POST", "/admin/v1/teams/t/keys", {"name": "k"}, expect=201)
    await admin.call("POST", "/admin/v1/teams/t/credits", {"amount": 9, "reason": "x"}, expect=200)
    key_id = created["id"]
    changed = await admin.call(
        "PATCH",
        f"/admin/v1/keys/{key_id}",
        {"name": "renamed", "rate_limit_per_minute": 1},
        expect=200,
    )
    assert changed["name"] == "renamed" and changed["rate_limit_per_minute"] == 1
    await admin.harness.gateway.keys.poll_once()
    client = admin.harness.client
    assert (await client.post("/api/v1/assess", headers=bearer(created["key"]))).status == 200
    assert (await client.post("/api/v1/assess", headers=bearer(created["key"]))).status == 429
    disabled = await admin.call("PATCH", f"/admin/v1/keys/{key_id}", {"disabled": True}, expect=200)
    assert disabled["status"] == "disabled"
    await admin.harness.gateway.keys.poll_once()
    assert (await client.post("/api/v1/assess", headers=bearer(created["key"]))).status == 401
    cleared = await admin.call(
        "PATCH",
        f"/admin/v1/keys/{key_id}",
        {"disabled": False, "rate_limit_per_minute": None},
        expect=200,
    )
    assert cleared["rate_limit_per_minute"] is None and cleared["status"] == "active"
    soon = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 1))
    expired = await admin.call(
        "PATCH", f"/admin/v1/keys/{key_id}", {"expires_at": soon}, expect=200
    )
    assert expired["status"] == "expired"


async def test_rotation_with_grace(admin: Admin) -> None:
    await admin.call("POST", "/admin/v1/teams", {"name": "t"}, expect=201)
    await admin.call("POST", "/admin/v1/teams/t/credits", {"amount": 9, "reason": "x"}, expect=200)
    old = await admin.call(
        "POST", "/admin/v1/teams/t/keys", {"name": "k", "rate_limit_per_minute": 7}, expect=201
    )
    new = await admin.call(
        "POST", f"/admin/v1/keys/{old['id']}/rotate", {"grace_seconds": 1}, expect=201
    )
    assert new["key"] != old["key"] and new["rate_limit_per_minute"] == 7
    assert new["name"] == "k" and new["rotated_from"] == old["id"]
    await admin.harness.gateway.keys.poll_once()
    client = admin.harness.client
    assert (await client.post("/api/v1/assess", headers=bearer(old["key"]))).status == 200
    assert (await client.post("/api/v1/assess", headers=bearer(new["key"]))).status == 200
    await asyncio.sleep(1.1)
    assert (await client.post("/api/v1/assess", headers=bearer(old["key"]))).status == 401
    assert (await client.post("/api/v1/assess", headers=bearer(new["key"]))).status == 200
    immediate = await admin.call("POST", f"/admin/v1/keys/{new['id']}/rotate", expect=201)
    await admin.harness.gateway.keys.poll_once()
    assert (await client.post("/api/v1/assess", headers=bearer(new["key"]))).status == 401
    assert (await client.post("/api/v1/assess", headers=bearer(immediate["key"]))).status == 200


async def test_revoke_by_secret(admin: Admin) -> None:
    await admin.call("POST", "/admin/v1/teams", {"name": "t"}, expect=201)
    created = await admin.call("POST", "/admin/v1/teams/t/keys", {"name": "k"}, expect=201)
    revoked = await admin.call(
        "POST", "/admin/v1/keys/revoke-by-secret", {"key": created["key"]}, expect=200
    )
    assert revoked["id"] == created["id"] and revoked["revoked_at"] is not None
    status, _ = await admin.call("POST", "/admin/v1/keys/revoke-by-secret", {"key": "ckiq_live_x"})
    assert status == 404


async def test_credits_grant_idempotency_and_adjustments(admin: Admin) -> None:
    team = await admin.call("POST", "/admin/v1/teams", {"name": "t"}, expect=201)
    headers = {"Idempotency-Key": "invoice-42"}
    first = await admin.call(
        "POST",
        "/admin/v1/teams/t/credits",
        {"amount": 100, "reason": "purchase"},
        headers=headers,
        expect=200,
    )
    again = await admin.call(
        "POST",
        "/admin/v1/teams/t/credits",
        {"amount": 100, "reason": "purchase"},
        headers=headers,
        expect=200,
    )
    assert first == again == {"team": team["id"], "environment": "live", "credits_available": 100}
    status, _ = await admin.call(
        "POST", "/admin/v1/teams/t/credits", {"amount": -101, "reason": "refund"}
    )
    assert status == 409
    down = await admin.call(
        "POST", "/admin/v1/teams/t/credits", {"amount": -40, "reason": "refund"}, expect=200
    )
    assert down["credits_available"] == 60
    test_env = await admin.call(
        "POST",
        "/admin/v1/teams/t/credits",
        {"amount": 3, "reason": "sandbox", "environment": "test"},
        expect=200,
    )
    assert test_env["environment"] == "test" and test_env["credits_available"] == 3
    credits = await admin.call("GET", "/admin/v1/teams/t/credits", expect=200)
    assert credits["balances"] == {"live": 60, "test": 3}
    assert [e["amount"] for e in credits["ledger"]] == [3, -40, 100]
    page = await admin.call("GET", "/admin/v1/teams/t/credits?limit=2", expect=200)
    assert len(page["ledger"]) == 2 and page["next_cursor"] is not None
    rest = await admin.call(
        "GET", f"/admin/v1/teams/t/credits?limit=2&cursor={page['next_cursor']}", expect=200
    )
    assert [e["amount"] for e in rest["ledger"]] == [100]


async def test_team_token_scope(admin: Admin) -> None:
    mine = await admin.call("POST", "/admin/v1/teams", {"name": "mine"}, expect=201)
    other = await admin.call("POST", "/admin/v1/teams", {"name": "other"}, expect=201)
    other_key = await admin.call(
        "POST", "/admin/v1/teams/other/keys", {"name": "theirs"}, expect=201
    )
    created = await admin.call("POST", "/admin/v1/teams/mine/tokens", {"name": "ci"}, expect=201)
    token = created["token"]
    assert token.startswith("ckiq_mgmt_")
    tokens = await admin.call("GET", "/admin/v1/teams/mine/tokens", expect=200)
    assert token not in str(tokens) and tokens["items"][0]["id"] == created["id"]

    # Its own team: keys can be created, listed, revoked.
    key = await admin.call(
        "POST", "/admin/v1/teams/mine/keys", {"name": "k"}, token=token, expect=201
    )
    listed = await admin.call("GET", f"/admin/v1/teams/{mine['id']}/keys", token=token, expect=200)
    assert [k["id"] for k in listed["items"]] == [key["id"]]
    teams = await admin.call("GET", "/admin/v1/teams", token=token, expect=200)
    assert [t["id"] for t in teams["items"]] == [mine["id"]]
    await admin.call("GET", "/admin/v1/teams/mine/credits", token=token, expect=200)
    # Another team does not exist for it.
    for method, path in [
        ("GET", f"/admin/v1/teams/{other['id']}/keys"),
        ("GET", "/admin/v1/teams/other/credits"),
        ("GET", "/admin/v1/teams/other/usage"),
        ("POST", f"/admin/v1/keys/{other_key['id']}/revoke"),
        ("PATCH", f"/admin/v1/keys/{other_key['id']}"),
    ]:
        status, _ = await admin.call(method, path, {} if method != "GET" else None, token=token)
        assert status == 404, (method, path)
    status, _ = await admin.call(
        "POST", "/admin/v1/keys/revoke-by-secret", {"key": other_key["key"]}, token=token
    )
    assert status == 404
    # Actions a team token may never take.
    status, _ = await admin.call(
        "POST", "/admin/v1/teams/mine/credits", {"amount": 5, "reason": "x"}, token=token
    )
    assert status == 403
    status, _ = await admin.call("POST", "/admin/v1/teams", {"name": "new"}, token=token)
    assert status == 403
    # Revoked, the token no longer works.
    await admin.call("POST", f"/admin/v1/tokens/{created['id']}/revoke", expect=200)
    status, _ = await admin.call("GET", "/admin/v1/teams", token=token)
    assert status == 401


async def test_audit_log_names_who_did_what(admin: Admin) -> None:
    await admin.call("POST", "/admin/v1/teams", {"name": "t"}, expect=201)
    token = await admin.call("POST", "/admin/v1/teams/t/tokens", {"name": "ci"}, expect=201)
    key = await admin.call(
        "POST", "/admin/v1/teams/t/keys", {"name": "k"}, token=token["token"], expect=201
    )
    await admin.call(
        "POST", "/admin/v1/teams/t/credits", {"amount": 5, "reason": "why"}, expect=200
    )
    entries = (await admin.call("GET", "/admin/v1/audit", expect=200))["items"]
    actions = [(e["actor"], e["action"]) for e in entries]
    assert actions == [
        ("admin", "credits.grant"),
        (f"token:{token['id']}", "key.create"),
        ("admin", "token.create"),
        ("admin", "team.create"),
    ]
    assert entries[1]["target"] == key["id"] and entries[1]["client_ip"] == "127.0.0.1"
    assert entries[0]["details"]["reason"] == "why"
    assert key["key"] not in str(entries) and token["token"] not in str(entries)
    seen_by_token = await admin.call("GET", "/admin/v1/audit", token=token["token"], expect=200)
    assert all(e["team"] is not None for e in seen_by_token["items"])


async def test_a_change_is_made_only_with_its_audit_entry(admin: Admin) -> None:
    """The entry is written in the change's transaction: when it cannot be, nothing changes."""
    await admin.call("POST", "/admin/v1/teams", {"name": "t"}, expect=201)
    key = await admin.call("POST", "/admin/v1/teams/t/keys", {"name": "k"}, expect=201)
    storage = admin.harness.gateway.settings.storage
    database = sqlite3.connect(storage.removeprefix("sqlite:///"))
    try:
        # The audit table goes missing (a disk or a schema gone wrong, here by hand).
        database.execute("ALTER TABLE audit_log RENAME TO audit_log_away")
        status, body = await admin.call("POST", f"/admin/v1/keys/{key['id']}/revoke")
        assert (status, body["error"]) == (503, "The database is unavailable")
        status, _ = await admin.call(
            "POST", "/admin/v1/teams/t/credits", {"amount": 5, "reason": "r"}
        )
        assert status == 503
        database.execute("ALTER TABLE audit_log_away RENAME TO audit_log")
    finally:
        database.close()
    # Neither happened: the key still works, the balance is what it was.
    [shown] = (await admin.call("GET", "/admin/v1/teams/t/keys", expect=200))["items"]
    assert (shown["id"], shown["revoked_at"]) == (key["id"], None)
    resp = await admin.harness.client.post("/api/v1/assess", headers=bearer(key["key"]))
    assert resp.status == 402
    await admin.call("POST", f"/admin/v1/keys/{key['id']}/revoke", expect=200)
    entries = (await admin.call("GET", "/admin/v1/audit", expect=200))["items"]
    assert [e["action"] for e in entries] == ["key.revoke", "key.create", "team.create"]


async def test_usage_counts_by_outcome(admin: Admin) -> None:
    await admin.call("POST", "/admin/v1/teams", {"name": "t"}, expect=201)
    await admin.call("POST", "/admin/v1/teams/t/credits", {"amount": 2, "reason": "x"}, expect=200)
    key = await admin.call("POST", "/admin/v1/teams/t/keys", {"name": "k"}, expect=201)
    client = admin.harness.client
    statuses = [
        (await client.post("/api/v1/assess", headers=bearer(key["key"]))).status for _ in range(3)
    ]
    assert statuses == [200, 200, 402]
    await admin.harness.gateway.usage.flush()
    usage = await admin.call("GET", "/admin/v1/teams/t/usage?granularity=minute", expect=200)
    assert usage["totals"] == {
        "requests": {"ok": 2, "insufficient_credits": 1},
        "total": 3,
        "credits": 2,
    }
    assert usage["top_keys"] == [{"key": key["id"], "requests": 3, "credits": 2}]
    assert sum(b["total"] for b in usage["buckets"]) == 3
    by_key = await admin.call(
        "GET", f"/admin/v1/teams/t/usage?key_id={key['id']}&granularity=day", expect=200
    )
    assert by_key["totals"]["total"] == 3
    listed = await admin.call("GET", "/admin/v1/teams/t/keys", expect=200)
    assert listed["items"][0]["last_used_at"] is not None


async def test_bad_input_is_named(admin: Admin) -> None:
    await admin.call("POST", "/admin/v1/teams", {"name": "t"}, expect=201)
    cases = [
        ("POST", "/admin/v1/teams", "not json", 400, None),
        ("POST", "/admin/v1/teams", [1, 2], 400, None),
        ("POST", "/admin/v1/teams", {}, 422, "name"),
        ("POST", "/admin/v1/teams", {"name": ""}, 422, "name"),
        ("POST", "/admin/v1/teams", {"name": "x" * 101}, 422, "name"),
        ("POST", "/admin/v1/teams", {"name": "ok", "colour": "red"}, 422, "colour"),
        ("POST", "/admin/v1/teams/t/keys", {"name": 5}, 422, "name"),
        (
            "POST",
            "/admin/v1/teams/t/keys",
            {"name": "k", "environment": "prod"},
            422,
            "environment",
        ),
        (
            "POST",
            "/admin/v1/teams/t/keys",
            {"name": "k", "rate_limit_per_minute": 0},
            422,
            "rate_limit_per_minute",
        ),
        (
            "POST",
            "/admin/v1/teams/t/keys",
            {"name": "k", "expires_at": "tomorrow"},
            422,
            "expires_at",
        ),
        ("POST", "/admin/v1/teams/t/credits", {"amount": "5", "reason": "x"}, 422, "amount"),
        ("POST", "/admin/v1/teams/t/credits", {"amount": 5}, 422, "reason"),
        ("POST", "/admin/v1/teams/t/credits", {"amount": 0, "reason": "x"}, 422, "amount"),
        ("POST", "/admin/v1/teams/nobody/keys", {"name": "k"}, 404, None),
        ("PATCH", "/admin/v1/keys/key_nope", {"name": "k"}, 404, None),
        ("GET", "/admin/v1/teams/t/usage?granularity=week", None, 422, "granularity"),
        ("GET", "/admin/v1/teams?limit=0", None, 422, "limit"),
    ]
    for method, path, body, status, field in cases:
        if isinstance(body, str):
            got, payload = await admin.raw(method, path, body.encode())
        else:
            got, payload = await admin.call(method, path, body)
        assert got == status, (method, path, body, got, payload)
        assert "error" in payload and "details" in payload
        if field is not None:
            assert field in [d["field"] for d in payload["details"]], payload
    status, payload = await admin.raw(
        "POST", "/admin/v1/teams", b"{" + b" " * (1024 * 1024 + 10) + b"}"
    )
    assert status == 413 and "error" in payload


async def test_openapi_matches_the_router(admin: Admin) -> None:
    document = await (await admin.client.get("/admin/v1/openapi.json")).json()
    assert document["openapi"].startswith("3.1")
    documented = {
        (method.upper(), path) for path, ops in document["paths"].items() for method in ops
    }
    routed = {
        (route.method, route.resource.canonical)
        for route in admin.client.app.router.routes()  # type: ignore[union-attr]
        if route.resource is not None
        and route.resource.canonical.startswith("/admin/v1/")
        and route.method != "HEAD"
        and route.resource.canonical != "/admin/v1/openapi.json"
    }
    assert documented == routed
    contract = {
        ("POST", "/admin/v1/teams"),
        ("GET", "/admin/v1/teams"),
        ("POST", "/admin/v1/teams/{team}/keys"),
        ("GET", "/admin/v1/teams/{team}/keys"),
        ("PATCH", "/admin/v1/keys/{key_id}"),
        ("POST", "/admin/v1/keys/{key_id}/revoke"),
        ("POST", "/admin/v1/keys/revoke-by-secret"),
        ("PATCH", "/admin/v1/teams/{team}"),
        ("GET", "/admin/v1/audit"),
        ("POST", "/admin/v1/keys/{key_id}/rotate"),
        ("POST", "/admin/v1/teams/{team}/credits"),
        ("GET", "/admin/v1/teams/{team}/credits"),
        ("GET", "/admin/v1/teams/{team}/usage"),
        ("POST", "/admin/v1/teams/{team}/tokens"),
        ("GET", "/admin/v1/teams/{team}/tokens"),
        ("POST", "/admin/v1/tokens/{token_id}/revoke"),
    }
    assert contract <= documented
