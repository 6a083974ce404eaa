"""The command line, run as a separate process against the gateway's own database."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import yaml

from .conftest import MakeGateway, bearer


async def cli(config: Path, *args: str, stdin: bytes | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.cli",
        *args,
        "--config",
        str(config),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate(stdin)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def cli_config(tmp_path: Path) -> Path:
    path = tmp_path / "cli.yaml"
    # No admin token: management commands never open the admin listener.
    path.write_text(
        yaml.safe_dump(
            {
                "storage": f"sqlite:///{tmp_path / 'gateway.db'}",
                "admin": {"token": "${GATEWAY_ADMIN_TOKEN_UNSET_IN_TESTS}"},
            }
        )
    )
    return path


async def test_manage_and_revoke_from_another_process(
    make_gateway: MakeGateway, tmp_path: Path
) -> None:
    gw = await make_gateway()
    config = cli_config(tmp_path)
    code, out, err = await cli(config, "teams", "create", "cli-team", "--json")
    assert code == 0, err
    team = json.loads(out)
    code, out, err = await cli(
        config, "keys", "create", "--team", "cli-team", "--name", "prod", "--json"
    )
    assert code == 0, err
    created = json.loads(out)
    secret = created["key"]
    assert secret.startswith("ckiq_live_") and created["prefix"] == secret[:14]
    code, out, err = await cli(
        config, "credits", "grant", "--team", "cli-team", "--amount", "3", "--reason", "trial"
    )
    assert code == 0, err
    assert "3" in out

    resp = await gw.client.post("/api/v1/assess", headers=bearer(secret))
    assert resp.status == 200

    code, out, err = await cli(config, "keys", "list", "--team", team["id"])
    assert code == 0, err
    assert created["id"] in out and "active" in out and secret not in out

    code, out, err = await cli(config, "keys", "revoke", created["id"])
    assert code == 0, err
    revoked_at = time.monotonic()
    # Requests sent before the revocation reaches this process are still served
    # (and charged): count them, so the balance check below is exact.
    served = 1
    while (
        status := (await gw.client.post("/api/v1/assess", headers=bearer(secret))).status
    ) != 401:
        assert status in (200, 402), status
        served += status == 200
        assert time.monotonic() - revoked_at < 1.0, "revocation from another process took over 1 s"
        await asyncio.sleep(0.02)
    print(f"revocation visible after {time.monotonic() - revoked_at:.3f} s, {served} served")

    await gw.settle()
    code, out, err = await cli(config, "credits", "balance", "--team", "cli-team", "--json")
    assert code == 0, err
    assert served <= 3
    assert json.loads(out)["balances"] == {"live": 3 - served, "test": 0}
    code, out, err = await cli(config, "credits", "reconcile")
    assert code == 0, err
    assert out.startswith("OK")


async def test_revoke_leaked_reads_stdin(make_gateway: MakeGateway, tmp_path: Path) -> None:
    gw = await make_gateway()
    secret = await gw.key()
    config = cli_config(tmp_path)
    code, out, err = await cli(config, "keys", "revoke-leaked", stdin=secret.encode() + b"\n")
    assert code == 0, err
    assert secret not in out and secret[:14] in out
    code, _, err = await cli(config, "keys", "revoke-leaked", stdin=b"ckiq_live_nonsense\n")
    assert code == 1 and "not a valid key" in err


async def test_errors_are_one_sentence(tmp_path: Path) -> None:
    config = cli_config(tmp_path)
    code, _, err = await cli(config, "keys", "list", "--team", "nobody")
    assert code == 1
    assert err.strip() == "gateway: no such team (--team)"
    code, _, err = await cli(config, "teams", "create", "dup")
    code, _, err = await cli(config, "teams", "create", "dup")
    assert code == 1 and "already exists" in err and "Traceback" not in err
    code, _, err = await cli(
        config, "credits", "grant", "--team", "dup", "--amount", "-5", "--reason", "x"
    )
    assert code == 1 and "below zero" in err
    code, _, err = await cli(tmp_path / "missing.yaml", "teams", "list")
    assert code == 2 and "file not found" in err


async def test_run_refuses_workers_on_embedded_backends(tmp_path: Path) -> None:
    config = cli_config(tmp_path)
    code, _, err = await cli(config, "run", "--workers", "2")
    assert code in (1, 2)
    assert "--workers above 1 needs limiter" in err or "admin.token" in err


async def test_reconcile_detects_a_tampered_balance(
    make_gateway: MakeGateway, tmp_path: Path
) -> None:
    import sqlite3

    gw = await make_gateway()
    await gw.key(credits=5)
    await gw.settle()
    db = sqlite3.connect(tmp_path / "gateway.db")
    db.execute("UPDATE balances SET available = available + 1")
    db.commit()
    db.close()
    code, out, _ = await cli(cli_config(tmp_path), "credits", "reconcile", "--json")
    assert code == 3
    result = json.loads(out)
    assert result["ok"] is False
    assert result["mismatches"][0]["stored"] == 6 and result["mismatches"][0]["derived"] == 5


async def test_requests_lists_the_request_log(make_gateway: MakeGateway, tmp_path: Path) -> None:
    gw = await make_gateway()
    secret = await gw.key(credits=1)
    statuses = [
        (await gw.client.post("/api/v1/assess", headers=bearer(secret))).status for _ in range(2)
    ]
    assert statuses == [200, 402]
    assert gw.gateway.request_log is not None
    await gw.gateway.request_log.flush()
    config = cli_config(tmp_path)
    code, out, err = await cli(config, "requests", "--team", "acme", "--since", "1h", "--json")
    assert code == 0, err
    assert [(r["status"], r["credits"]) for r in json.loads(out)] == [(402, 0), (200, 1)]
    code, out, err = await cli(config, "requests", "--team", "acme", "--status", "4xx")
    assert code == 0, err
    assert "insufficient_credits" in out and " ok " not in out and secret not in out
    code, out, err = await cli(config, "requests", "--team", "acme", "--status", "5xx")
    assert (code, out.strip()) == (0, "no requests match")


async def test_usage_export_streams_csv(make_gateway: MakeGateway, tmp_path: Path) -> None:
    gw = await make_gateway()
    secret = await gw.key(credits=5)
    for _ in range(2):
        assert (await gw.client.post("/api/v1/assess", headers=bearer(secret))).status == 200
    assert gw.gateway.request_log is not None
    await gw.gateway.request_log.flush()
    config = cli_config(tmp_path)
    code, out, err = await cli(config, "usage", "export", "--team", "acme")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("time,request_id,key_id") and len(lines) == 3
    code, out, err = await cli(
        config, "usage", "export", "--team", "acme", "--format", "cloudevents"
    )
    assert code == 0, err
    assert [json.loads(line)["data"]["credits"] for line in out.splitlines()] == [1, 1]
    code, _, err = await cli(config, "usage", "export", "--team", "acme", "--from", "yesterday")
    assert code == 1 and err.startswith("gateway: ") and "from" in err


async def test_a_spend_cap_set_from_another_process_holds_at_once(
    make_gateway: MakeGateway, tmp_path: Path
) -> None:
    gw = await make_gateway()
    secret = await gw.key(credits=50)
    [key] = await gw.gateway.management.keys("acme")
    config = cli_config(tmp_path)
    code, out, err = await cli(config, "keys", "update", key.id, "--credit-cap-per-day", "2")
    assert code == 0, err
    assert "credit cap per day 2" in out
    statuses = []
    deadline = time.monotonic() + 2.0
    # The change reaches this process through the key-change feed (within a poll).
    while len(statuses) < 20 and time.monotonic() < deadline:
        statuses.append((await gw.client.post("/api/v1/assess", headers=bearer(secret))).status)
        if statuses[-1] == 402:
            break
        await asyncio.sleep(0.05)
    assert statuses[-1] == 402
    code, out, err = await cli(config, "keys", "update", key.id, "--credit-cap-per-day", "0")
    assert code == 1 and "--credit-cap-per-day must be an integer from 1" in err, err
    code, out, err = await cli(config, "keys", "update", key.id, "--credit-cap-per-day", "none")
    assert code == 0, err
    code, out, err = await cli(config, "keys", "list", "--team", "acme", "--json")
    assert json.loads(out)[0]["credit_cap_per_day"] is None
    await gw.assert_reconciled()


async def test_team_quotas_from_the_command_line(make_gateway: MakeGateway, tmp_path: Path) -> None:
    gw = await make_gateway()
    secret = await gw.key(credits=10, rate_limit=None)
    config = cli_config(tmp_path)
    code, out, err = await cli(config, "teams", "update", "acme", "--quota-per-day", "1")
    assert code == 0, err
    assert "quota per day 1" in out and "rate limit none" in out
    deadline = time.monotonic() + 2.0
    statuses = []
    while time.monotonic() < deadline:
        statuses.append((await gw.client.post("/api/v1/assess", headers=bearer(secret))).status)
        if statuses[-1] == 429:
            break
        await asyncio.sleep(0.05)
    assert statuses[-1] == 429
    code, out, err = await cli(config, "teams", "update", "acme", "--quota-per-day", "none")
    assert code == 0 and "quota per day" not in out, (out, err)
    code, _, err = await cli(config, "teams", "update", "acme", "--quota-per-month", "x")
    assert code == 2 and "--quota-per-month" in err
