"""``gateway webhooks ...`` as a separate process against the gateway's database."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tests.test_cli import cli, cli_config


def allowing_loopback(tmp_path: Path) -> Path:
    config = cli_config(tmp_path)
    data = yaml.safe_load(config.read_text())
    data["webhooks"] = {"allow_private_addresses": True}
    config.write_text(yaml.safe_dump(data))
    return config


async def test_webhooks_create_list_update_test_deliveries_delete(tmp_path: Path) -> None:
    config = allowing_loopback(tmp_path)
    assert (await cli(config, "teams", "create", "acme"))[0] == 0
    code, out, err = await cli(
        config, "webhooks", "create", "--team", "acme", "--url", "http://127.0.0.1:9/hook",
        "--events", "key.created, credits.low", "--description", "ops", "--json",
    )  # fmt: skip
    assert code == 0, err
    made = json.loads(out)
    assert made["secret"].startswith("whsec_") and made["events"] == ["key.created", "credits.low"]
    code, out, err = await cli(config, "webhooks", "list", "--team", "acme")
    assert code == 0 and made["id"] in out and "whsec_" not in out, err
    code, out, err = await cli(config, "webhooks", "update", made["id"], "--disable", "--json")
    assert code == 0 and json.loads(out)["enabled"] is False, err
    code, out, err = await cli(config, "webhooks", "test", made["id"], "--json")
    assert code == 0 and json.loads(out)["event_id"].startswith("evt_"), err
    code, out, err = await cli(config, "webhooks", "deliveries", made["id"])
    assert code == 0 and "no delivery attempts yet" in out, err
    code, out, err = await cli(
        config, "webhooks", "alert", "--team", "acme", "--low-balance", "100", "--json"
    )
    assert code == 0 and json.loads(out)["low_balance_threshold"] == 100, err
    code, out, err = await cli(config, "webhooks", "rotate-secret", made["id"], "--grace", "60")
    assert code == 0 and "whsec_" in out and made["secret"] not in out, err
    code, out, err = await cli(config, "webhooks", "delete", made["id"])
    assert code == 0 and "deleted" in out, err
    code, out, err = await cli(config, "audit", "--team", "acme", "--json")
    assert code == 0, err
    actions = {entry["action"] for entry in json.loads(out)}
    assert {"webhook.create", "webhook.update", "webhook.delete", "alert.set"} <= actions


async def test_a_bad_webhook_is_one_line_naming_the_flag(tmp_path: Path) -> None:
    config = cli_config(tmp_path)  # private addresses refused, as by default
    await cli(config, "teams", "create", "acme")
    code, _, err = await cli(config, "webhooks", "create", "--team", "acme",
                             "--url", "http://10.0.0.1/hook", "--events", "*")  # fmt: skip
    assert code != 0 and "--url" in err and "not a public address" in err, err
    code, _, err = await cli(config, "webhooks", "create", "--team", "acme",
                             "--url", "ftp://x/y", "--events", "nope")  # fmt: skip
    assert code != 0 and "--url" in err and "--events" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    code, _, err = await cli(config, "webhooks", "retry", "whep_00", "whd_00")
    assert code != 0 and "webhook" in err and "Traceback" not in err
