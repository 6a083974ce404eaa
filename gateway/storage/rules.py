"""The rules both backends apply, and the refusals they raise, written once.

Checks of input (key fields, grants, ledger cursors), the answer to a
replayed grant, the change feed's gap rule, and the errors whose wording the
admin API and CLI show: a backend finds the facts, these decide.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import math
import re
import secrets
import time
from collections.abc import Mapping, Sequence

from gateway.storage import (
    KEY_FIELDS,
    KEY_LIMIT_FIELDS,
    MAX_BALANCE,
    Conflict,
    GrantResult,
    KeyChange,
    KeyReused,
    NotFound,
)

__all__ = [
    "balances_by_environment",
    "changes_after",
    "check_grant",
    "checked_key_changes",
    "decode_ledger_cursor",
    "encode_ledger_cursor",
    "grant_key_reused",
    "ip_within",
    "key_already_revoked",
    "key_hash_exists",
    "key_revoked",
    "new_id",
    "new_reservation_id",
    "no_key",
    "no_team",
    "no_token",
    "replayed_grant",
    "team_exists",
    "token_already_revoked",
    "token_hash_exists",
]

# Ledger cursors carry a time the backends can store (up to 9999-12-31T23:59:59Z).
_LATEST = 253_402_300_799.0
_ENTRY_ID = re.compile(r"[cpr][\x20-\x7e]{1,200}\Z", re.ASCII)  # printable ASCII: no NUL


def new_id(prefix: str) -> str:
    """A fresh id for a team, key or token: ``prefix`` and 16 hex digits."""
    return f"{prefix}_{secrets.token_hex(8)}"


def new_reservation_id() -> str:
    """A fresh reservation id: ``rsv_``, the time in milliseconds (12 hex digits), 80 random bits.

    The id is the reservations table's primary key. Starting with the time, each insert
    lands next to the last one on the index's right edge instead of on a random leaf:
    as the table grows, a batch dirties (and writes to the WAL) a few pages, not one a
    reservation (bench/reservation_ids.py). The random part keeps ids made in the same
    millisecond, on any replica, apart: two alike would read as one retried reservation.
    """
    return f"rsv_{time.time_ns() // 1_000_000:012x}{secrets.token_hex(10)}"


# -- refusals ---------------------------------------------------------------------------


def no_team(team_id: str) -> NotFound:
    return NotFound(f"no team {team_id!r}")


def no_key(key_id: str) -> NotFound:
    return NotFound(f"no key {key_id!r}")


def no_token(token_id: str) -> NotFound:
    return NotFound(f"no token {token_id!r}")


def team_exists(name: str) -> Conflict:
    return Conflict(f"a team named {name!r} already exists")


def key_revoked(key_id: str) -> Conflict:
    return Conflict(f"key {key_id!r} is revoked")


def key_already_revoked(key_id: str) -> Conflict:
    return Conflict(f"key {key_id!r} is already revoked")


def token_already_revoked(token_id: str) -> Conflict:
    return Conflict(f"token {token_id!r} is already revoked")


def key_hash_exists() -> Conflict:
    return Conflict("a key with this hash exists already")


def token_hash_exists() -> Conflict:
    return Conflict("a token with this hash exists already")


def grant_key_reused() -> KeyReused:
    return KeyReused("this Idempotency-Key was used for a different grant")


# -- rules ------------------------------------------------------------------------------


def changes_after(seq: int, changes: Sequence[KeyChange]) -> tuple[int, list[KeyChange], bool]:
    """The answer of ``key_changes_since(seq)`` given the changes read after ``seq``."""
    if not changes:
        return seq, [], False
    # A gap right after what we saw means entries were pruned: the caller
    # must forget everything rather than trust a partial feed.
    gap = changes[0].seq > seq + 1 and seq > 0
    return changes[-1].seq, list(changes), gap


def balances_by_environment(found: Mapping[str, int]) -> dict[str, int]:
    """Both environments' balances; an account never written holds 0."""
    return {"live": found.get("live", 0), "test": found.get("test", 0)}


def checked_key_changes(changes: Mapping[str, object]) -> dict[str, object]:
    """``changes`` for :meth:`Store.update_key`, checked: known fields, right types.

    Raises ValueError naming the first bad field; backends build their UPDATE
    from the result, so only :data:`KEY_FIELDS` can ever reach the SQL.
    """
    checked: dict[str, object] = {}
    for field_name in sorted(changes):
        value = changes[field_name]
        if field_name not in KEY_FIELDS:
            raise ValueError(f"unknown key field {field_name!r}")
        if field_name == "name":
            ok = isinstance(value, str)
        elif field_name == "disabled":
            ok = isinstance(value, bool)
        elif value is None:
            ok = True  # rate_limit_per_minute and expires_at may be cleared
        elif isinstance(value, bool):
            ok = False
        elif field_name == "rate_limit_per_minute" or field_name in KEY_LIMIT_FIELDS:
            ok = isinstance(value, int)
        elif isinstance(value, int | float) and math.isfinite(value):
            ok, value = True, float(value)
        else:
            ok = False
        if not ok:
            raise ValueError(f"bad value for key field {field_name!r}: {value!r}")
        checked[field_name] = value
    return checked


def check_grant(current: int, amount: int, environment: str) -> None:
    """The rule both backends apply to a grant against the balance it finds (Conflict)."""
    if current + amount < 0:
        raise Conflict(
            f"an adjustment of {amount} would take the {environment} balance ({current}) below zero"
        )
    if current + amount > MAX_BALANCE:
        raise Conflict(f"a balance may not exceed {MAX_BALANCE}")


def replayed_grant(
    seen: Mapping[str, object], amount: int, environment: str, request_hash: str | None
) -> GrantResult:
    """The answer to a grant whose Idempotency-Key the team used before.

    Entries written before request hashes were kept (or by callers that send
    none) are compared by amount and environment, as they were then.
    """
    stored_hash = seen.get("request_hash")
    if stored_hash is not None and request_hash is not None:
        same = stored_hash == request_hash
    else:
        same = seen.get("amount") == amount and seen.get("environment") == environment
    if not same:
        raise grant_key_reused()
    balance = seen.get("balance_after")
    return GrantResult(int(balance) if isinstance(balance, int) else 0, replayed=True)


def encode_ledger_cursor(created_at: float, entry_id: str) -> str:
    """The opaque paging cursor of a ledger entry (URL-safe)."""
    raw = f"{created_at!r} {entry_id}".encode()
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def decode_ledger_cursor(cursor: str) -> tuple[float, str]:
    """(created_at, entry id) of a cursor; ValueError when it is not one of ours."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise ValueError("not a ledger cursor") from None
    at, _, entry_id = raw.partition(" ")
    if not _ENTRY_ID.match(entry_id) or not at.isascii():
        raise ValueError("not a ledger cursor")
    created_at = float(at)  # ValueError as well
    # 1e300 is finite, and no backend stores a time that far (PostgreSQL: DataError).
    if not 0.0 <= created_at <= _LATEST:
        raise ValueError("not a ledger cursor")
    return created_at, entry_id


def ip_within(address: str | None, network: str | None) -> bool:
    """Whether ``address`` lies in ``network`` (CIDR); False for text that is neither.

    SQLite's filter for a request log search by network (PostgreSQL compares inet).
    """
    if not address or not network:
        return False
    try:
        return ipaddress.ip_address(address) in ipaddress.ip_network(network, strict=False)
    except ValueError:
        return False
