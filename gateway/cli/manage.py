"""Management commands: teams, keys, tokens, credits, audit, usage (parity with the admin API).

Each command calls the management service as the CLI's operator; the service
checks the input against the same bounds as the admin API and writes the
audit entry. Its problems are printed as one sentence naming the flag.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from gateway.cli._common import CliError, emit, table, with_management
from gateway.manage import Management, operator
from gateway.manage.bounds import LIST_MAX
from gateway.manage.inputs import parse_time
from gateway.manage.keys import LIMIT_BOUNDS
from gateway.manage.reads import usage_range
from gateway.manage.teams import TEAM_QUOTA_FIELDS
from gateway.serialize import audit_json, key_json, ledger_json, team_json, token_json

__all__ = ["COMMANDS"]


def _time(text: str | None, flag: str) -> float | None:
    if text is None or text in ("", "never", "none"):
        return None
    return parse_time(text, flag)


async def _all(fetch: Any) -> list[Any]:
    out: list[Any] = []
    after = None
    while True:
        page = await fetch(500, after)
        out += page
        if len(page) < 500:
            return out
        after = page[-1].id


# -- teams ----------------------------------------------------------------------------------


def teams_create(args: argparse.Namespace) -> None:
    async def work(m: Management) -> dict[str, Any]:
        return team_json(await m.create_team(args.name, args.rate_limit, actor=operator()))

    team = with_management(args, work)
    emit(args, team, f"created team {team['name']} ({team['id']})")


def teams_list(args: argparse.Namespace) -> None:
    async def work(m: Management) -> list[dict[str, Any]]:
        return [team_json(t) for t in await _all(m.teams)]

    teams = with_management(args, work)
    emit(args, teams, table(teams, ["id", "name", "rate_limit_per_minute", "created_at"]))


def teams_update(args: argparse.Namespace) -> None:
    quotas: dict[str, int | None] = {}
    for field in TEAM_QUOTA_FIELDS:
        given = getattr(args, field)
        if given is not None:
            quotas[field] = None if given == "none" else given

    async def work(m: Management) -> dict[str, Any]:
        if quotas:
            await m.set_team_quotas(args.team, quotas, actor=operator())
        # As in the admin API: the rate limit is left alone when only quotas are given.
        if args.rate_limit is not None or not quotas:
            await m.update_team(args.team, args.rate_limit, actor=operator())
        return team_json(await m.team(args.team, actor=operator()))

    team = with_management(args, work)
    limit = team["rate_limit_per_minute"]
    emit(
        args,
        team,
        f"team {team['name']}: rate limit {limit if limit else 'none'} per minute"
        + "".join(
            f", {field.replace('_', ' ')} {team[field]}"
            for field in TEAM_QUOTA_FIELDS
            if team[field] is not None
        ),
    )


# -- keys -----------------------------------------------------------------------------------


def keys_create(args: argparse.Namespace) -> None:
    expires_at = _time(args.expires_at, "expires_at")
    # 'none' means not set, as when the flag is left out.
    limits = {f: getattr(args, f) for f in LIMIT_BOUNDS if getattr(args, f) not in (None, "none")}

    async def work(m: Management) -> dict[str, Any]:
        created = await m.create_key(
            args.team, args.name, args.env, args.rate_limit, expires_at,
            limits=limits, actor=operator(),
        )  # fmt: skip
        return {**key_json(created.key), "key": created.secret}

    key = with_management(args, work)
    emit(
        args,
        key,
        f"created key {key['id']} ({key['name']}, {key['environment']}) for team {key['team']}\n\n"
        f"    {key['key']}\n\n"
        "Copy it now: it is shown this once and cannot be shown again.",
    )


def keys_list(args: argparse.Namespace) -> None:
    async def work(m: Management) -> list[dict[str, Any]]:
        team = await m.team(args.team)
        return [key_json(k) for k in await _all(lambda n, a: m.keys(team.id, n, a))]

    keys = with_management(args, work)
    emit(
        args,
        keys,
        table(
            keys,
            [
                "id",
                "name",
                "prefix",
                "environment",
                "status",
                "created_at",
                "last_used_at",
                "expires_at",
            ],
        ),
    )


def keys_revoke(args: argparse.Namespace) -> None:
    async def work(m: Management) -> dict[str, Any]:
        return key_json(await m.revoke_key(args.key_id, actor=operator()))

    key = with_management(args, work)
    emit(args, key, f"revoked key {key['id']} ({key['prefix']}…)")


def keys_revoke_leaked(args: argparse.Namespace) -> None:
    if sys.stdin.isatty():
        print("Paste the leaked key and press Enter:", file=sys.stderr)
    secret = sys.stdin.readline().strip()
    if not secret:
        raise CliError("no key on standard input")

    async def work(m: Management) -> dict[str, Any]:
        return key_json(await m.revoke_leaked(secret, actor=operator()))

    key = with_management(args, work)
    emit(args, key, f"revoked key {key['id']} ({key['prefix']}…) of team {key['team']}")


def keys_rotate(args: argparse.Namespace) -> None:
    async def work(m: Management) -> dict[str, Any]:
        created = await m.rotate_key(args.key_id, args.grace, actor=operator())
        return {**key_json(created.key), "key": created.secret, "rotated_from": args.key_id}

    key = with_management(args, work)
    ends = "now" if args.grace == 0 else f"in {args.grace} s"
    emit(
        args,
        key,
        f"rotated {args.key_id} into {key['id']}; the old key stops working {ends}.\n\n"
        f"    {key['key']}\n\n"
        "Copy it now: it is shown this once and cannot be shown again.",
    )


def keys_update(args: argparse.Namespace) -> None:
    changes: dict[str, object] = {}
    if args.name is not None:
        changes["name"] = args.name
    if args.rate_limit is not None:
        changes["rate_limit_per_minute"] = args.rate_limit
    if args.expires_at is not None:
        changes["expires_at"] = _time(args.expires_at, "expires_at")
    if args.disable:
        changes["disabled"] = True
    if args.enable:
        changes["disabled"] = False
    for field in LIMIT_BOUNDS:
        given = getattr(args, field)
        if given is not None:
            changes[field] = None if given == "none" else given
    if not changes:
        raise CliError(
            "nothing to change: give --name, --rate-limit, --expires-at, --disable, --enable, "
            "--credit-cap-per-day, --credit-cap-per-month, --quota-per-day or --quota-per-month"
        )

    async def work(m: Management) -> dict[str, Any]:
        return key_json(await m.update_key(args.key_id, changes, actor=operator()))

    key = with_management(args, work)
    emit(
        args,
        key,
        f"key {key['id']}: {key['name']}, {key['status']}, "
        f"rate limit {key['rate_limit_per_minute'] or 'default'}, "
        f"expires {key['expires_at'] or 'never'}"
        + "".join(
            f", {field.replace('_', ' ')} {key[field]}"
            for field in LIMIT_BOUNDS
            if key[field] is not None
        ),
    )


# -- team tokens --------------------------------------------------------------------------------


def tokens_create(args: argparse.Namespace) -> None:
    async def work(m: Management) -> dict[str, Any]:
        created = await m.create_token(args.team, args.name, actor=operator())
        return {**token_json(created.token), "token": created.secret}

    token = with_management(args, work)
    emit(
        args,
        token,
        f"created management token {token['id']} for team {token['team']}\n\n"
        f"    {token['token']}\n\nCopy it now: it is shown this once.",
    )


def tokens_list(args: argparse.Namespace) -> None:
    async def work(m: Management) -> list[dict[str, Any]]:
        team = await m.team(args.team)
        return [token_json(t) for t in await _all(lambda n, a: m.tokens(team.id, n, a))]

    tokens = with_management(args, work)
    emit(args, tokens, table(tokens, ["id", "name", "prefix", "created_at", "revoked_at"]))


def tokens_revoke(args: argparse.Namespace) -> None:
    async def work(m: Management) -> dict[str, Any]:
        return token_json(await m.revoke_token(args.token_id, actor=operator()))

    token = with_management(args, work)
    emit(args, token, f"revoked management token {token['id']}")


# -- credits, audit, usage ------------------------------------------------------------------------


def credits_grant(args: argparse.Namespace) -> None:
    async def work(m: Management) -> dict[str, Any]:
        granted = await m.grant(
            args.team, args.amount, args.reason, environment=args.env, actor=operator()
        )
        balance = granted.balance
        return {"team": granted.team.id, "environment": args.env, "credits_available": balance}

    result = with_management(args, work)
    emit(args, result, f"{args.env} balance of {args.team} is now {result['credits_available']}")


def credits_balance(args: argparse.Namespace) -> None:
    if not 1 <= args.history <= LIST_MAX:
        raise CliError(f"--history must be an integer from 1 to {LIST_MAX}")

    async def work(m: Management) -> dict[str, Any]:
        team, balances = await m.balances(args.team)
        entries = await m.ledger(team.id, args.history)
        return {"team": team.id, "balances": balances, "ledger": [ledger_json(e) for e in entries]}

    result = with_management(args, work)
    rows = [{"environment": env, "credits_available": n} for env, n in result["balances"].items()]
    text = table(rows, ["environment", "credits_available"])
    if result["ledger"]:
        text += "\n\n" + table(
            result["ledger"], ["created_at", "environment", "kind", "amount", "reason"]
        )
    emit(args, result, text)


def credits_reconcile(args: argparse.Namespace) -> None:
    async def work(m: Management) -> dict[str, Any]:
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
                    # Set when what differs is a capped key's spend in one period.
                    "key": x.key_id,
                    "period": x.period,
                }
                for x in mismatches
            ],
        }

    result = with_management(args, work)
    if result["ok"]:
        text = (
            "OK: every balance and capped key's spend equals the sum of its ledger "
            f"({result['pending_reservations']} reservations pending)"
        )
    else:
        text = "MISMATCH:\n" + table(
            result["mismatches"], ["team", "environment", "key", "period", "stored", "derived"]
        )
    emit(args, result, text)
    if not result["ok"]:
        raise SystemExit(3)


def audit(args: argparse.Namespace) -> None:
    async def work(m: Management) -> list[dict[str, Any]]:
        return [audit_json(e) for e in await m.audit(args.team, args.limit)]

    entries = with_management(args, work)
    emit(args, entries, table(entries, ["at", "actor", "action", "target", "team", "client_ip"]))


def usage(args: argparse.Namespace) -> None:
    if args.what == "export":
        _export(args)
        return
    start, end, step = usage_range(args.granularity, None, None, time.time(), args.buckets)

    async def work(m: Management) -> dict[str, Any]:
        team = await m.team(args.team)
        report = await m.usage(team.id, start, end, step, args.key)
        return {"team": team.id, "granularity": args.granularity, **report}

    report = with_management(args, work)
    outcomes = sorted({o for b in report["buckets"] for o in b["requests"]})
    rows = [
        {"start": b["start"], "total": b["total"], "credits": b["credits"], **b["requests"]}
        for b in report["buckets"]
        if b["total"]
    ]
    text = (
        table(rows, ["start", "total", "credits", *outcomes])
        if rows
        else "no requests in this range"
    )
    emit(args, report, text)


def _export(args: argparse.Namespace) -> None:
    """``gateway usage export``: the admin API's export, written to stdout as it is read."""
    until = _time(args.until, "to") or time.time()
    since = _time(args.since, "from")

    async def work(m: Management) -> None:
        pages = await m.export(
            args.team, until - 86_400 if since is None else since, until, args.format, args.per,
            actor=operator(),
        )  # fmt: skip
        async for chunk in pages:
            sys.stdout.buffer.write(chunk)
        sys.stdout.flush()

    with_management(args, work)


COMMANDS = {
    "teams": {"create": teams_create, "list": teams_list, "update": teams_update},
    "keys": {
        "create": keys_create,
        "list": keys_list,
        "revoke": keys_revoke,
        "revoke-leaked": keys_revoke_leaked,
        "rotate": keys_rotate,
        "update": keys_update,
    },
    "tokens": {"create": tokens_create, "list": tokens_list, "revoke": tokens_revoke},
    "credits": {"grant": credits_grant, "balance": credits_balance, "reconcile": credits_reconcile},
}
