"""The ``gateway`` command line (contract §3).

Management commands talk to the store directly through the same
:class:`~gateway.management.Management` service the admin API uses.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NoReturn, TypeVar

import orjson

from gateway.config import DEFAULT_CONFIG_PATH, ConfigError, Settings, load_settings
from gateway.management import Management
from gateway.storage import Backend, StorageError, open_backend

__all__ = ["main"]

T = TypeVar("T")


class CliError(Exception):
    """One clear sentence for stderr."""


def _fail(message: str, code: int = 1) -> NoReturn:
    print(f"gateway: {message}", file=sys.stderr)
    raise SystemExit(code)


def _config_path(args: argparse.Namespace) -> str:
    return str(args.config or os.environ.get("GATEWAY_CONFIG") or DEFAULT_CONFIG_PATH)


def _settings(args: argparse.Namespace, *, serving: bool = False) -> Settings:
    return load_settings(_config_path(args), serving=serving)


def _table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    # Ten lines of formatting; not worth a dependency.
    cells = [[("" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    if args.json:
        sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print(text)


def _with_backend(
    args: argparse.Namespace, work: Callable[[Management, Backend, Settings], Awaitable[T]]
) -> T:
    settings = _settings(args)

    async def run() -> T:
        backend = open_backend(settings.storage, lease_seconds=settings.lease_seconds)
        await backend.open()
        try:
            await backend.migrate()
            return await work(Management(backend, settings), backend, settings)
        finally:
            await backend.close()

    return asyncio.run(run())


# -- commands ------------------------------------------------------------------------


def cmd_check_config(args: argparse.Namespace) -> None:
    settings = load_settings(args.path)
    print(
        f"{args.path}: OK ({len(settings.routes)} routes, {len(settings.upstreams)} upstreams, "
        f"storage {settings.storage_kind}, limiter {settings.limiter.kind})"
    )


def cmd_migrate(args: argparse.Namespace) -> None:
    async def work(_: Management, backend: Backend, __: Settings) -> list[int]:
        return await backend.migrate()

    applied = _with_backend(args, work)
    _emit(
        args,
        {"applied": applied},
        f"applied migrations {', '.join(map(str, applied))}" if applied else "schema is up to date",
    )


def cmd_run(args: argparse.Namespace) -> None:
    from gateway.logs import configure_logging
    from gateway.server import serve

    settings = _settings(args, serving=True)
    if args.workers < 1:
        raise CliError("--workers must be at least 1")
    if args.workers > 1 and (
        settings.limiter.kind == "memory" or settings.storage_kind == "sqlite"
    ):
        raise CliError(
            "--workers above 1 needs limiter: redis://... and storage: postgresql://...; "
            "with the in-process limiter and SQLite every worker would enforce its own limits"
        )
    configure_logging(settings.logging)
    if args.workers > 1:
        from gateway.workers import supervise

        raise SystemExit(supervise(_config_path(args), args.workers))
    _install_uvloop()
    # A worker of a supervisor shares its listeners with its siblings.
    asyncio.run(serve(settings, reuse_port=os.environ.get("GATEWAY_WORKER") == "1"))


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - optional on platforms without it
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def cmd_demo(args: argparse.Namespace) -> None:
    from gateway.demo import run_demo

    _install_uvloop()
    run_demo(args)


def cmd_teams_create(args: argparse.Namespace) -> None:
    from gateway.admin.routes import team_json

    async def work(m: Management, _: Backend, __: Settings) -> dict[str, Any]:
        return team_json(await m.create_team(args.name, args.rate_limit))

    team = _with_backend(args, work)
    _emit(args, team, f"created team {team['name']} ({team['id']})")


def cmd_teams_list(args: argparse.Namespace) -> None:
    from gateway.admin.routes import team_json

    async def work(m: Management, _: Backend, __: Settings) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        after = None
        while True:
            page = await m.teams(500, after)
            out += [team_json(t) for t in page]
            if len(page) < 500:
                return out
            after = page[-1].id

    teams = _with_backend(args, work)
    _emit(args, teams, _table(teams, ["id", "name", "rate_limit_per_minute", "created_at"]))


def cmd_keys_create(args: argparse.Namespace) -> None:
    from gateway.admin.routes import key_json

    async def work(m: Management, _: Backend, __: Settings) -> dict[str, Any]:
        created = await m.create_key(args.team, args.name, args.env, args.rate_limit)
        body = key_json(created.key)
        body["key"] = created.secret
        return body

    key = _with_backend(args, work)
    _emit(
        args,
        key,
        f"created key {key['id']} ({key['name']}, {key['environment']}) for team {key['team']}\n\n"
        f"    {key['key']}\n\n"
        "Copy it now: it is shown this once and cannot be shown again.",
    )


def cmd_keys_list(args: argparse.Namespace) -> None:
    from gateway.admin.routes import key_json

    async def work(m: Management, _: Backend, __: Settings) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        after = None
        while True:
            page = await m.keys(args.team, 500, after)
            out += [key_json(k) for k in page]
            if len(page) < 500:
                return out
            after = page[-1].id

    keys = _with_backend(args, work)
    for key in keys:
        key["status"] = (
            "revoked" if key["revoked_at"] else "disabled" if key["disabled"] else "active"
        )
    _emit(
        args,
        keys,
        _table(
            keys, ["id", "name", "prefix", "environment", "status", "created_at", "last_used_at"]
        ),
    )


def cmd_keys_revoke(args: argparse.Namespace) -> None:
    from gateway.admin.routes import key_json

    async def work(m: Management, _: Backend, __: Settings) -> dict[str, Any]:
        return key_json(await m.revoke_key(args.key_id))

    key = _with_backend(args, work)
    _emit(args, key, f"revoked key {key['id']} ({key['prefix']}…)")


def cmd_keys_revoke_leaked(args: argparse.Namespace) -> None:
    from gateway.admin.routes import key_json

    if sys.stdin.isatty():
        print("Paste the leaked key and press Enter:", file=sys.stderr)
    secret = sys.stdin.readline().strip()
    if not secret:
        raise CliError("no key on standard input")

    async def work(m: Management, _: Backend, __: Settings) -> dict[str, Any]:
        return key_json(await m.revoke_leaked(secret))

    key = _with_backend(args, work)
    _emit(args, key, f"revoked key {key['id']} ({key['prefix']}…) of team {key['team']}")


def cmd_credits_grant(args: argparse.Namespace) -> None:
    if args.amount == 0:
        raise CliError("--amount must not be 0")
    if not args.reason.strip():
        raise CliError("--reason must not be empty")

    async def work(m: Management, _: Backend, __: Settings) -> dict[str, Any]:
        team, balance = await m.grant(
            args.team, args.amount, args.reason, environment=args.env, actor="cli"
        )
        return {"team": team.id, "environment": args.env, "credits_available": balance}

    result = _with_backend(args, work)
    _emit(args, result, f"{args.env} balance of {args.team} is now {result['credits_available']}")


def cmd_credits_balance(args: argparse.Namespace) -> None:
    async def work(m: Management, _: Backend, __: Settings) -> dict[str, Any]:
        team, balances = await m.balances(args.team)
        return {"team": team.id, "balances": balances}

    result = _with_backend(args, work)
    rows = [{"environment": env, "credits_available": n} for env, n in result["balances"].items()]
    _emit(args, result, _table(rows, ["environment", "credits_available"]))


def cmd_credits_reconcile(args: argparse.Namespace) -> None:
    async def work(m: Management, _: Backend, __: Settings) -> dict[str, Any]:
        mismatches, pending = await m.reconcile()
        return {
            "ok": not mismatches,
            "pending_reservations": pending,
            "mismatches": [
                {
                    "team": x.team_id,
                    "environment": x.environment,
                    "stored": x.stored,
                    "derived": x.derived,
                }
                for x in mismatches
            ],
        }

    result = _with_backend(args, work)
    if result["ok"]:
        text = (
            "OK: every balance equals the sum of its ledger "
            f"({result['pending_reservations']} reservations pending)"
        )
    else:
        text = "MISMATCH:\n" + _table(
            result["mismatches"], ["team", "environment", "stored", "derived"]
        )
    _emit(args, result, text)
    if not result["ok"]:
        raise SystemExit(3)


# -- parser ---------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config", help=f"config file (default: $GATEWAY_CONFIG, else {DEFAULT_CONFIG_PATH})"
    )
    common.add_argument("--json", action="store_true", help="machine-readable output")

    parser = argparse.ArgumentParser(prog="gateway", description="API gateway for metered APIs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        parent: Any, name: str, fn: Callable[[argparse.Namespace], None], help_text: str
    ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(name, parents=[common], help=help_text)
        p.set_defaults(fn=fn)
        return p

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

    teams = sub.add_parser("teams", help="manage teams").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    p = command(teams, "create", cmd_teams_create, "create a team")
    p.add_argument("name")
    p.add_argument("--rate-limit", type=int, help="team-wide requests per minute")
    command(teams, "list", cmd_teams_list, "list teams")

    keys = sub.add_parser("keys", help="manage API keys").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    p = command(keys, "create", cmd_keys_create, "create a key (shown once)")
    p.add_argument("--team", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--env", choices=("live", "test"), default="live")
    p.add_argument("--rate-limit", type=int, help="requests per minute for this key")
    p = command(keys, "list", cmd_keys_list, "list a team's keys")
    p.add_argument("--team", required=True)
    p = command(keys, "revoke", cmd_keys_revoke, "revoke a key now")
    p.add_argument("key_id")
    command(keys, "revoke-leaked", cmd_keys_revoke_leaked, "revoke a key read from stdin")

    credits = sub.add_parser("credits", help="manage credits").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    p = command(credits, "grant", cmd_credits_grant, "grant (or, negative, adjust) credits")
    p.add_argument("--team", required=True)
    p.add_argument("--amount", type=int, required=True)
    p.add_argument("--reason", required=True)
    p.add_argument("--env", choices=("live", "test"), default="live")
    p = command(credits, "balance", cmd_credits_balance, "show a team's balances")
    p.add_argument("--team", required=True)
    command(credits, "reconcile", cmd_credits_reconcile, "prove balances equal their ledger")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        args.fn(args)
    except ConfigError as exc:
        _fail(str(exc), 2)
    except (StorageError, CliError) as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"{exc.strerror or exc}")
    except KeyboardInterrupt:
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
