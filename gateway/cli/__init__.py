"""The ``gateway`` command line (contract §3).

Management commands talk to the store directly through the same
:class:`~gateway.management.Management` service the admin API uses.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

from gateway.cli import manage
from gateway.cli._common import CliError, fail
from gateway.cli.serve import cmd_check_config, cmd_demo, cmd_migrate, cmd_run
from gateway.config import DEFAULT_CONFIG_PATH, ConfigError
from gateway.storage import StorageError

__all__ = ["main"]

Command = Callable[[argparse.Namespace], None]


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config", help=f"config file (default: $GATEWAY_CONFIG, else {DEFAULT_CONFIG_PATH})"
    )
    common.add_argument("--json", action="store_true", help="machine-readable output")

    parser = argparse.ArgumentParser(prog="gateway", description="API gateway for metered APIs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(parent: Any, name: str, fn: Command, help_text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(name, parents=[common], help=help_text)
        p.set_defaults(fn=fn)
        return p

    def group(name: str, help_text: str) -> Any:
        return sub.add_parser(name, help=help_text).add_subparsers(
            dest="action", required=True, metavar="ACTION"
        )

    run = command(sub, "run", cmd_run, "serve the gateway")
    run.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    demo = command(sub, "demo", cmd_demo, "run the gateway with a demo upstream, team and key")
    demo.add_argument("--port", type=int, default=8080, help="public port (default 8080)")
    demo.add_argument("--upstream-port", type=int, default=8000, help="demo upstream port")
    demo.add_argument("--status-port", type=int, default=9091)
    demo.add_argument("--admin-port", type=int, default=9090)
    command(sub, "migrate", cmd_migrate, "create or upgrade the database schema")
    check = command(sub, "check-config", cmd_check_config, "validate a config file")
    check.add_argument("path")

    teams = group("teams", "manage teams")
    p = command(teams, "create", manage.teams_create, "create a team")
    p.add_argument("name")
    p.add_argument("--rate-limit", type=int, help="team-wide requests per minute")
    command(teams, "list", manage.teams_list, "list teams")
    p = command(teams, "update", manage.teams_update, "change a team's settings")
    p.add_argument("team")
    p.add_argument("--rate-limit", type=int, help="team-wide requests per minute (omit to clear)")

    keys = group("keys", "manage API keys")
    p = command(keys, "create", manage.keys_create, "create a key (shown once)")
    p.add_argument("--team", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--env", choices=("live", "test"), default="live")
    p.add_argument("--rate-limit", type=int, help="requests per minute for this key")
    p.add_argument("--expires-at", help="RFC 3339 time after which the key stops working")
    p = command(keys, "list", manage.keys_list, "list a team's keys")
    p.add_argument("--team", required=True)
    p = command(keys, "revoke", manage.keys_revoke, "revoke a key now")
    p.add_argument("key_id")
    command(keys, "revoke-leaked", manage.keys_revoke_leaked, "revoke a key read from stdin")
    p = command(keys, "rotate", manage.keys_rotate, "replace a key, the old one expiring later")
    p.add_argument("key_id")
    p.add_argument("--grace", type=int, default=0, help="seconds the old key keeps working")
    p = command(keys, "update", manage.keys_update, "change a key")
    p.add_argument("key_id")
    p.add_argument("--name")
    p.add_argument("--rate-limit", type=int)
    p.add_argument("--expires-at", help="RFC 3339 time, or 'never'")
    toggle = p.add_mutually_exclusive_group()
    toggle.add_argument("--disable", action="store_true")
    toggle.add_argument("--enable", action="store_true")

    tokens = group("tokens", "manage team-scoped management tokens")
    p = command(tokens, "create", manage.tokens_create, "create a token (shown once)")
    p.add_argument("--team", required=True)
    p.add_argument("--name", required=True)
    p = command(tokens, "list", manage.tokens_list, "list a team's tokens")
    p.add_argument("--team", required=True)
    p = command(tokens, "revoke", manage.tokens_revoke, "revoke a token")
    p.add_argument("token_id")

    credits = group("credits", "manage credits")
    p = command(credits, "grant", manage.credits_grant, "grant (or, negative, adjust) credits")
    p.add_argument("--team", required=True)
    p.add_argument("--amount", type=int, required=True)
    p.add_argument("--reason", required=True)
    p.add_argument("--env", choices=("live", "test"), default="live")
    p = command(credits, "balance", manage.credits_balance, "a team's balances and latest ledger")
    p.add_argument("--team", required=True)
    p.add_argument("--history", type=int, default=10, help="ledger entries to show")
    command(credits, "reconcile", manage.credits_reconcile, "prove balances equal their ledger")

    p = command(sub, "audit", manage.audit, "who changed what, when")
    p.add_argument("--team")
    p.add_argument("--limit", type=int, default=50)
    p = command(sub, "usage", manage.usage, "request counts by outcome and credits charged")
    p.add_argument("--team", required=True)
    p.add_argument("--granularity", choices=("minute", "hour", "day"), default="hour")
    p.add_argument("--buckets", type=int, default=24, help="how many buckets back from now")
    p.add_argument("--key", help="one key id only")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        args.fn(args)
    except ConfigError as exc:
        fail(str(exc), 2)
    except (StorageError, CliError) as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"{exc.strerror or exc}")
    except KeyboardInterrupt:
        raise SystemExit(130) from None
