"""``gateway plans set|show|clear`` as a separate process against the gateway's database."""

from __future__ import annotations

import json
from pathlib import Path

from tests.test_cli import cli, cli_config


async def test_plans_set_show_clear(tmp_path: Path) -> None:
    config = cli_config(tmp_path)
    code, _, err = await cli(config, "teams", "create", "acme")
    assert code == 0, err
    code, out, err = await cli(
        config, "plans", "set", "--team", "acme", "--allowance", "300", "--period", "week",
        "--anchor-day", "3", "--rollover", "carry", "--max-balance", "900", "--json",
    )  # fmt: skip
    assert code == 0, err
    shown = json.loads(out)
    assert (shown["allowance"], shown["anchor_day"], shown["max_balance"]) == (300, 3, 900)
    code, out, err = await cli(config, "credits", "balance", "--team", "acme", "--json")
    assert code == 0, err
    assert json.loads(out)["balances"]["live"] == 300
    code, out, err = await cli(config, "plans", "show", "--team", "acme")
    assert code == 0, err
    assert "carry" in out and "week:" in out
    code, out, err = await cli(config, "plans", "clear", "--team", "acme")
    assert code == 0 and "cleared" in out, err
    code, out, err = await cli(config, "plans", "show", "--team", "acme")
    assert code == 0 and "no plan" in out, err
    code, out, err = await cli(config, "credits", "reconcile", "--json")
    assert code == 0 and json.loads(out)["ok"], err


async def test_a_bad_plan_is_one_line_naming_the_flag(tmp_path: Path) -> None:
    config = cli_config(tmp_path)
    await cli(config, "teams", "create", "acme")
    code, _, err = await cli(
        config, "plans", "set", "--team", "acme", "--allowance", "0", "--period", "day"
    )
    assert code != 0 and "allowance" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    code, _, err = await cli(config, "plans", "clear", "--team", "acme")
    assert code != 0 and "plan" in err and "Traceback" not in err
