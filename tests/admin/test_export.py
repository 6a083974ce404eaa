"""Usage export: CSV and CloudEvents, per request and per period, streamed in constant memory."""

from __future__ import annotations

import csv
import io
import json
import time
import tracemalloc
from pathlib import Path

from gateway.config import Settings
from gateway.manage import Management
from gateway.storage import RequestEntry
from gateway.storage.sqlite import SqliteBackend

from ..conftest import bearer
from .conftest import ADMIN, Admin


async def _traffic(admin: Admin) -> dict[str, str]:
    await admin.call("POST", "/admin/v1/teams", {"name": "t"}, expect=201)
    await admin.call("POST", "/admin/v1/teams/t/credits", {"amount": 2, "reason": "x"}, expect=200)
    key = await admin.call("POST", "/admin/v1/teams/t/keys", {"name": "k"}, expect=201)
    for _ in range(3):
        await admin.harness.client.post("/api/v1/assess", headers=bearer(key["key"]))
    gateway = admin.harness.gateway
    assert gateway.request_log is not None
    await gateway.request_log.flush()
    await gateway.usage.flush()
    return dict(key)


async def _export(admin: Admin, query: str) -> tuple[int, str, str]:
    resp = await admin.client.get(f"/admin/v1/teams/t/usage/export{query}", headers=ADMIN)
    return resp.status, resp.headers.get("Content-Type", ""), await resp.text()


async def test_per_request_csv_and_cloudevents(admin: Admin) -> None:
    key = await _traffic(admin)
    status, kind, text = await _export(admin, "")
    assert (status, kind) == (200, "text/csv; charset=utf-8")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [(r["status"], r["credits"], r["key_id"]) for r in rows] == [
        ("200", "1", key["id"]),
        ("200", "1", key["id"]),
        ("402", "0", key["id"]),
    ]  # oldest first, as a bill reads
    status, kind, text = await _export(admin, "?format=cloudevents")
    assert status == 200 and kind.startswith("application/cloudevents-batch+jsonl")
    events = [json.loads(line) for line in text.splitlines()]
    assert len(events) == 3 and len({e["id"] for e in events}) == 3
    for event in events:
        # CloudEvents 1.0 required attributes, and OpenMeter's subject and data.
        assert event["specversion"] == "1.0" and event["source"] and event["type"]
        assert event["subject"].startswith("team_")
        assert event["data"]["key_id"] == key["id"]
    assert [e["data"]["credits"] for e in events] == [1, 1, 0]


async def test_per_hour_totals(admin: Admin) -> None:
    await _traffic(admin)
    status, _, text = await _export(admin, "?per=hour")
    assert status == 200
    rows = list(csv.DictReader(io.StringIO(text)))
    by_outcome = {r["outcome"]: (int(r["requests"]), int(r["credits"])) for r in rows}
    assert by_outcome == {"ok": (2, 2), "insufficient_credits": (1, 0)}
    status, _, text = await _export(admin, "?per=day&format=cloudevents")
    assert status == 200
    assert sum(json.loads(line)["data"]["requests"] for line in text.splitlines()) == 3


async def test_bad_parameters_and_other_teams(admin: Admin) -> None:
    await _traffic(admin)
    for query, field in [("?format=xml", "format"), ("?per=week", "per"),
                         ("?from=2026-01-02T00:00:00Z&to=2026-01-01T00:00:00Z", "from")]:  # fmt: skip
        resp = await admin.client.get(f"/admin/v1/teams/t/usage/export{query}", headers=ADMIN)
        body = await resp.json()
        assert resp.status == 422 and [d["field"] for d in body["details"]] == [field], body
    await admin.call("POST", "/admin/v1/teams", {"name": "other"}, expect=201)
    token = await admin.call("POST", "/admin/v1/teams/other/tokens", {"name": "ci"}, expect=201)
    resp = await admin.client.get(
        "/admin/v1/teams/t/usage/export", headers={"Authorization": f"Bearer {token['token']}"}
    )
    assert resp.status == 404


async def _peak_while_exporting(m: Management, team_id: str, until: float) -> tuple[int, int]:
    """(rows, peak bytes traced) over a whole per-request export."""
    tracemalloc.start()
    try:
        lines = 0
        async for chunk in await m.export(team_id, 0.0, until, "cloudevents"):
            lines += chunk.count(b"\n")
        return lines, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


async def test_an_export_holds_one_page_whatever_its_size(tmp_path: Path) -> None:
    backend = SqliteBackend(str(tmp_path / "export.db"), lease_seconds=60)
    await backend.open()
    await backend.migrate()
    try:
        team = await backend.create_team("big")
        small = await backend.create_team("small")
        now = time.time()

        def rows(team_id: str, n: int) -> list[RequestEntry]:
            return [
                RequestEntry(now - n + i, team_id, "key_1", "ckiq_live_ab12", "live", f"r{i}",
                             "POST", "/a", "/a", 200, "ok", 1, "10.0.0.1", "ua", 1.0)
                for i in range(n)
            ]  # fmt: skip

        many = rows(team.id, 100_000)
        for start in range(0, len(many), 10_000):
            await backend.add_requests(many[start : start + 10_000])
        await backend.add_requests(rows(small.id, 10_000))
        m = Management(backend, Settings(admin={"enabled": False}))
        big_rows, big_peak = await _peak_while_exporting(m, team.id, now + 1)
        small_rows, small_peak = await _peak_while_exporting(m, small.id, now + 1)
        assert (big_rows, small_rows) == (100_000, 10_000)
        # Ten times the rows, not ten times the memory: a page at a time.
        print(
            f"peak traced while exporting: {big_peak} B for 100,000 rows, {small_peak} B for 10,000"
        )
        assert big_peak < 2 * small_peak, (big_peak, small_peak)
    finally:
        await backend.close()
