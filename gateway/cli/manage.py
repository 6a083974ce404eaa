"""Management commands: teams, keys, tokens, credits, audit, usage (parity with the admin API).

Each change is written to the audit log with the actor ``cli``.
"""

from __future__ import annotations

import argparse
import getpass
import socket
import sys
import time
from datetime import datetime
from typing import Any

from gateway.cli._common import CliError, emit, table, with_management
from gateway.management import Management
from gateway.serialize import audit_json, key_json, ledger_json, team_json, token_json

__all__ = ["COMMANDS"]

GRANULARITY = {"minute": 60, "hour": 3600, "day": 86400}


def _actor() -> str:
    # Who ran it, as far as this machine knows; the CLI has no token to name.
    try:
        user = getpass.getuser()
    except Exception:
        user = "unknown"
    return f"cli:{user}@{socket.gethostname()}"


async def _audit(
    m: Management,
    action: str,
    target: str | None,
    team_id: str | None,
    details: dict[str, object] | None = None,
) -> None:
    await m.record_audit(
        actor=_actor(),
        action=action,
        target=target,
        team_id=team_id,
        client_ip=None,
        details=details or {},
    )


def _positive(value: int | None, flag: str) -> None:
    if value is not None and value < 1:
        raise CliError(f"{flag} must be at least 1")


def _time(text: str | None, flag: str) -> float | None:
    if text is None or text in ("", "never", "none"):
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise CliError(f"{flag} must be an RFC 3339 time such as 2027-01-31T00:00:00Z") from None
    if moment.tzinfo is None:
        raise CliError(f"{flag} needs a time zone, e.g. a trailing Z for UTC")
    return moment.timestamp()


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
    _positive(args.rate_limit, "--rate-limit")

    async def work(m: Management) -> dict[str, Any]:
        team = await m.create_team(args.name, args.rate_limit)
        await _audit(m, "team.create", team.id, team.id, {"name": team.name})
        return team_json(team)

    team = with_management(args, work)
    emit(args, team, f"created team {team['name']} ({team['id']})")


def teams_list(args: argparse.Namespace) -> None:
    async def work(m: Management) -> list[dict[str, Any]]:
        return [team_json(t) for t in await _all(m.teams)]

    teams = with_management(args, work)
    emit(args, teams, table(teams, ["id", "name", "rate_limit_per_minute", "created_at"]))


def teams_update(args: argparse.Namespace) -> None:
    _positive(args.rate_limit, "--rate-limit")

    async def work(m: Management) -> dict[str, Any]:
        team = await m.team(args.team)
        updated = await m.update_team(team.id, args.rate_limit)
        await _audit(m, "team.update", team.id, team.id, {"rate_limit_per_minute": args.rate_limit})
        return team_json(updated)

    team = with_management(args, work)
    limit = team["rate_limit_per_minute"]
    emit(args, team, f"team {team['name']}: rate limit {limit if limit else 'none'} per minute")


# -- keys -----------------------------------------------------------------------------------


def keys_create(args: argparse.Namespace) -> None:
    _positive(args.rate_limit, "--rate-limit")
    expires_at = _time(args.expires_at, "--expires-at")

    async def work(m: Management) -> dict[str, Any]:
        created = await m.create_key(args.team, args.name, args.env, args.rate_limit, expires_at)
        await _audit(
            m,
            "key.create",
            created.key.id,
            created.key.team_id,
            {"name": args.name, "environment": args.env},
        )
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
        key = await m.revoke_key(args.key_id)
        await _audit(m, "key.revoke", key.id, key.team_id)
        return key_json(key)

    key = with_management(args, work)
    emit(args, key, f"revoked key {key['id']} ({key['prefix']}…)")


def keys_revoke_leaked(args: argparse.Namespace) -> None:
    if sys.stdin.isatty():
        print("Paste the leaked key and press Enter:", file=sys.stderr)
    secret = sys.stdin.readline().strip()
    if not secret:
        raise CliError("no key on standard input")

    async def work(m: Management) -> dict[str, Any]:
        key = await m.key_by_secret(secret)
        revoked = await m.revoke_key(key.id)
        await _audit(m, "key.revoke_leaked", key.id, key.team_id, {"prefix": key.prefix})
        return key_json(revoked)

    key = with_management(args, work)
    emit(args, key, f"revoked key {key['id']} ({key['prefix']}…) of team {key['team']}")


def keys_rotate(args: argparse.Namespace) -> None:
    if args.grace < 0:
        raise CliError("--grace must not be negative")

    async def work(m: Management) -> dict[str, Any]:
        created = await m.rotate_key(args.key_id, args.grace)
        await _audit(
            m,
            "key.rotate",
            args.key_id,
            created.key.team_id,
            {"new_key": created.key.id, "grace_seconds": args.grace},
        )
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
        if not 1 <= len(args.name) <= 100:
            raise CliError("--name must be 1 to 100 characters")
        changes["name"] = args.name
    if args.rate_limit is not None:
        _positive(args.rate_limit, "--rate-limit")
        changes["rate_limit_per_minute"] = args.rate_limit
    if args.expires_at is not None:
        changes["expires_at"] = _time(args.expires_at, "--expires-at")
    if args.disable:
        changes["disabled"] = True
    if args.enable:
        changes["disabled"] = False
    if not changes:
        raise CliError(
            "nothing to change: give --name, --rate-limit, --expires-at, --disable or --enable"
        )

    async def work(m: Management) -> dict[str, Any]:
        key = await m.update_key(args.key_id, changes)
        await _audit(
            m,
            "key.update",
            key.id,
            key.team_id,
            {k: v for k, v in changes.items() if k != "expires_at"},
        )
        return key_json(key)

    key = with_management(args, work)
    emit(
        args,
        key,
        f"key {key['id']}: {key['name']}, {key['status']}, "
        f"rate limit {key['rate_limit_per_minute'] or 'default'}, "
        f"expires {key['expires_at'] or 'never'}",
    )


# -- team tokens --------------------------------------------------------------------------------


def tokens_create(args: argparse.Namespace) -> None:
    async def work(m: Management) -> dict[str, Any]:
        created = await m.create_token(args.team, args.name)
        await _audit(
            m, "token.create", created.token.id, created.token.team_id, {"name": args.name}
        )
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
        token = await m.revoke_token(args.token_id)
        await _audit(m, "token.revoke", token.id, token.team_id)
        return token_json(token)

    token = with_management(args, work)
    emit(args, token, f"revoked management token {token['id']}")


# -- credits, audit, usage ------------------------------------------------------------------------


def credits_grant(args: argparse.Namespace) -> None:
    if args.amount == 0:
        raise CliError("--amount must not be 0")
    if not args.reason.strip():
        raise CliError("--reason must not be empty")

    async def work(m: Management) -> dict[str, Any]:
        team, balance = await m.grant(
            args.team, args.amount, args.reason, environment=args.env, actor=_actor()
        )
        await _audit(
            m,
            "credits.grant" if args.amount > 0 else "credits.adjust",
            team.id,
            team.id,
            {"amount": args.amount, "environment": args.env, "reason": args.reason},
        )
        return {"team": team.id, "environment": args.env, "credits_available": balance}

    result = with_management(args, work)
    emit(args, result, f"{args.env} balance of {args.team} is now {result['credits_available']}")


def credits_balance(args: argparse.Namespace) -> None:
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
                }
                for x in mismatches
            ],
        }

    result = with_management(args, work)
    if result["ok"]:
        text = (
            "OK: every balance equals the sum of its ledger "
            f"({result['pending_reservations']} reservations pending)"
        )
    else:
        text = "MISMATCH:\n" + table(
            result["mismatches"], ["team", "environment", "stored", "derived"]
        )
    emit(args, result, text)
    if not result["ok"]:
        raise SystemExit(3)


def audit(args: argparse.Namespace) -> None:
    async def work(m: Management) -> list[dict[str, Any]]:
        team_id = (await m.team(args.team)).id if args.team else None
        return [audit_json(e) for e in await m.audit(team_id, args.limit)]

    entries = with_management(args, work)
    emit(args, entries, table(entries, ["at", "actor", "action", "target", "team", "client_ip"]))


def usage(args: argparse.Namespace) -> None:
    step = GRANULARITY[args.granularity]

    async def work(m: Management) -> dict[str, Any]:
        team = await m.team(args.team)
        end = time.time()
        report = await m.usage(team.id, end - step * args.buckets, end, step, args.key)
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
