"""The ``gateway`` command line (contract §3).

Management commands talk to the store directly through the same
:class:`~gateway.manage.Management` service the admin API uses, with the same
bounds and messages; every error is one sentence on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from gateway.cli import manage, requests
from gateway.cli import plans as cli_plans
from gateway.cli import webhooks as cli_webhooks
from gateway.cli._common import CliError, fail
from gateway.cli.serve import cmd_check_config, cmd_demo, cmd_migrate, cmd_run
from gateway.config import DEFAULT_CONFIG_PATH, ConfigError
from gateway.manage import InputError
from gateway.manage.bounds import AUDIT_DEFAULT
from gateway.manage.keys import LIMIT_BOUNDS
from gateway.storage import StorageError

__all__ = ["main"]

Command = Callable[[argparse.Namespace], None]

# How the service's field names are spelled on the command line.
FLAGS = {
    "name": "--name",
    "rate_limit_per_minute": "--rate-limit",
    "credit_cap_per_day": "--credit-cap-per-day",
    "credit_cap_per_month": "--credit-cap-per-month",
    "quota_per_day": "--quota-per-day",
    "quota_per_month": "--quota-per-month",
    "expires_at": "--expires-at",
    "grace_seconds": "--grace",
    "amount": "--amount",
    "reason": "--reason",
    "environment": "--env",
    "team": "--team",
    "limit": "--limit",
    "buckets": "--buckets",
    "granularity": "--granularity",
    "key_id": "KEY_ID",
    "token_id": "TOKEN_ID",
    "key": "the key on standard input",
    "url": "--url",
    "events": "--events",
    "description": "--description",
    "webhook_id": "WEBHOOK_ID",
    "delivery_id": "DELIVERY_ID",
    "low_balance_threshold": "--low-balance",
    "cursor": "--cursor",
}
_INTEGER = re.compile(r"[+-]?[0-9]{1,20}\Z", re.ASCII)


def _integer(text: str) -> int:
    """ASCII digits only: int() would also take Unicode digits such as "٣", and "1_0"."""
    if not _INTEGER.match(text):
        raise argparse.ArgumentTypeError("must be a whole number in ASCII digits")
    return int(text)


def _integer_or_none(text: str) -> int | str:
    """A cap or quota: a whole number, or 'none' (kept as the word) to clear it."""
    return text if text == "none" else _integer(text)


def _limit_flags(p: argparse.ArgumentParser, *fields: str) -> None:
    for field in fields:
        what = "credits" if field.startswith("credit") else "requests"
        per = field.rsplit("_", 1)[1]
        p.add_argument(
            FLAGS[field],
            dest=field,
            type=_integer_or_none,
            help=f"{what} per UTC {per} at most ('none' clears it)",
        )


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One sentence, as for every other error (argparse would add a usage block).
        fail(f"{message} (see '{self.prog} --help')", 2)


def _sentence(exc: InputError) -> str:
    """The service's problems, naming flags instead of fields."""
    if exc.status == 404 and exc.details:
        field, problem = exc.details[0]["field"], exc.details[0]["problem"]
        if problem == "not found":
            return f"{exc.message.lower()} ({FLAGS.get(field, field)})"
        return f"{FLAGS.get(field, field)} {problem}"
    parts = [f"{FLAGS.get(d['field'], d['field'])} {d['problem']}" for d in exc.details]
    return "; ".join(parts) or exc.message


class _Commands:
    """What each part of the command line is added with: its commands and groups."""

    def __init__(self, sub: Any, common: argparse.ArgumentParser) -> None:
        self.sub = sub
        self._common = common

    def command(
        self, parent: Any, name: str, fn: Command, help_text: str
    ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(name, parents=[self._common], help=help_text)
        p.set_defaults(fn=fn)
        return p

    def group(self, name: str, help_text: str) -> Any:
        return self.sub.add_parser(name, help=help_text).add_subparsers(
            dest="action", required=True, metavar="ACTION"
        )


def _parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument(
        "--config", help=f"config file (default: $GATEWAY_CONFIG, else {DEFAULT_CONFIG_PATH})"
    )
    common.add_argument("--json", action="store_true", help="machine-readable output")

    parser = _Parser(prog="gateway", description="API gateway for metered APIs")
    c = _Commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"), common)
    _serving(c)
    _teams_and_keys(c)
    _tokens_and_credits(c)
    _plans(c)
    cli_webhooks.register(c.group, c.command, _integer)
    _reads(c)
    return parser


def _serving(c: _Commands) -> None:
    run = c.command(c.sub, "run", cmd_run, "serve the gateway")
    run.add_argument("--workers", type=_integer, default=1, help="worker processes (default 1)")
    demo = c.command(c.sub, "demo", cmd_demo, "run the gateway with a demo upstream, team and key")
    demo.add_argument("--port", type=_integer, default=8080, help="public port (default 8080)")
    demo.add_argument("--upstream-port", type=_integer, default=8000, help="demo upstream port")
    demo.add_argument("--status-port", type=_integer, default=9091)
    demo.add_argument("--admin-port", type=_integer, default=9090)
    c.command(c.sub, "migrate", cmd_migrate, "create or upgrade the database schema")
    check = c.command(c.sub, "check-config", cmd_check_config, "validate a config file")
    check.add_argument("path")


def _teams_and_keys(c: _Commands) -> None:
    teams = c.group("teams", "manage teams")
    p = c.command(teams, "create", manage.teams_create, "create a team")
    p.add_argument("name")
    p.add_argument("--rate-limit", type=_integer, help="team-wide requests per minute")
    c.command(teams, "list", manage.teams_list, "list teams")
    p = c.command(teams, "update", manage.teams_update, "change a team's settings")
    p.add_argument("team")
    p.add_argument(
        "--rate-limit",
        type=_integer,
        help="team-wide requests per minute (omitted, and no quota given: cleared)",
    )
    _limit_flags(p, "quota_per_day", "quota_per_month")

    keys = c.group("keys", "manage API keys")
    p = c.command(keys, "create", manage.keys_create, "create a key (shown once)")
    p.add_argument("--team", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--env", choices=("live", "test"), default="live")
    p.add_argument("--rate-limit", type=_integer, help="requests per minute for this key")
    p.add_argument("--expires-at", help="RFC 3339 time after which the key stops working")
    _limit_flags(p, *LIMIT_BOUNDS)
    p = c.command(keys, "list", manage.keys_list, "list a team's keys")
    p.add_argument("--team", required=True)
    p = c.command(keys, "revoke", manage.keys_revoke, "revoke a key now")
    p.add_argument("key_id")
    c.command(keys, "revoke-leaked", manage.keys_revoke_leaked, "revoke a key read from stdin")
    p = c.command(keys, "rotate", manage.keys_rotate, "replace a key, the old one expiring later")
    p.add_argument("key_id")
    p.add_argument("--grace", type=_integer, default=0, help="seconds the old key keeps working")
    p = c.command(keys, "update", manage.keys_update, "change a key")
    p.add_argument("key_id")
    p.add_argument("--name")
    p.add_argument("--rate-limit", type=_integer)
    _limit_flags(p, *LIMIT_BOUNDS)
    p.add_argument("--expires-at", help="RFC 3339 time, or 'never'")
    toggle = p.add_mutually_exclusive_group()
    toggle.add_argument("--disable", action="store_true")
    toggle.add_argument("--enable", action="store_true")


def _tokens_and_credits(c: _Commands) -> None:
    tokens = c.group("tokens", "manage team-scoped management tokens")
    p = c.command(tokens, "create", manage.tokens_create, "create a token (shown once)")
    p.add_argument("--team", required=True)
    p.add_argument("--name", required=True)
    p = c.command(tokens, "list", manage.tokens_list, "list a team's tokens")
    p.add_argument("--team", required=True)
    p = c.command(tokens, "revoke", manage.tokens_revoke, "revoke a token")
    p.add_argument("token_id")

    credits = c.group("credits", "manage credits")
    p = c.command(credits, "grant", manage.credits_grant, "grant (or, negative, adjust) credits")
    p.add_argument("--team", required=True)
    p.add_argument("--amount", type=_integer, required=True)
    p.add_argument("--reason", required=True)
    p.add_argument("--env", choices=("live", "test"), default="live")
    p = c.command(credits, "balance", manage.credits_balance, "a team's balances and latest ledger")
    p.add_argument("--team", required=True)
    p.add_argument("--history", type=_integer, default=10, help="ledger entries to show")
    c.command(credits, "reconcile", manage.credits_reconcile, "prove balances equal their ledger")


def _plans(c: _Commands) -> None:
    plans = c.group("plans", "manage team plans (credits refilled every period)")
    p = c.command(plans, "set", cli_plans.plans_set, "set a team's plan; refills this period once")
    p.add_argument("--team", required=True)
    p.add_argument("--allowance", type=_integer, required=True, help="credits per period")
    p.add_argument("--period", choices=("day", "week", "month"), required=True)
    p.add_argument("--anchor-day", type=_integer, help="weekday 1-7 or day of month 1-28")
    p.add_argument("--rollover", choices=("expire", "carry"), default="expire")
    p.add_argument("--max-balance", type=_integer, help="refills stop at this balance")
    p.add_argument("--env", choices=("live", "test"), default="live")
    p = c.command(plans, "show", cli_plans.plans_show, "a team's plans and their next refills")
    p.add_argument("--team", required=True)
    p = c.command(plans, "clear", cli_plans.plans_clear, "remove a team's plan (balance stays)")
    p.add_argument("--team", required=True)
    p.add_argument("--env", choices=("live", "test"), default="live")


def _reads(c: _Commands) -> None:
    p = c.command(c.sub, "audit", manage.audit, "who changed what, when")
    p.add_argument("--team")
    p.add_argument("--limit", type=_integer, default=AUDIT_DEFAULT)
    p = c.command(c.sub, "requests", requests.requests, "a team's request log, newest first")
    p.add_argument("--team", required=True)
    p.add_argument("--key", help="one key id only")
    p.add_argument("--since", help="how far back: 30s, 15m, 1h, 7d")
    p.add_argument("--status", help="a status (429) or a class (4xx)")
    p.add_argument("--outcome", help="ok, rate_limited, insufficient_credits, ...")
    p.add_argument("--client-ip", help="an address or a CIDR network")
    p.add_argument("--path-prefix", help="paths starting with this")
    p.add_argument("--limit", type=_integer, default=50)
    p = c.command(c.sub, "usage", manage.usage, "request counts by outcome and credits charged")
    p.add_argument("what", nargs="?", choices=("export",), help="export: stream usage out")
    p.add_argument("--team", required=True)
    p.add_argument("--from", dest="since", help="export: RFC 3339 start (default 24 h ago)")
    p.add_argument("--to", dest="until", help="export: RFC 3339 end (default now)")
    p.add_argument("--format", choices=("csv", "cloudevents"), default="csv")
    p.add_argument("--per", choices=("request", "hour", "day"), default="request")
    p.add_argument("--granularity", choices=("minute", "hour", "day"), default="hour")
    p.add_argument("--buckets", type=_integer, default=24, help="how many buckets back from now")
    p.add_argument("--key", help="one key id only")


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        args.fn(args)
    except ConfigError as exc:
        fail(str(exc), 2)
    except InputError as exc:
        fail(_sentence(exc))
    except (StorageError, CliError) as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"{exc.strerror or exc}")
    except KeyboardInterrupt:
        raise SystemExit(130) from None
