"""PostgreSQL: teams, keys, team tokens, the audit log.

Key writes are logged to ``key_changes`` and announced with ``pg_notify`` by
triggers, in the writing transaction (see listen.py for the other end).
"""

from __future__ import annotations

from collections.abc import Mapping

import asyncpg

from gateway.models import ApiKey, AuditEntry, KeyRecord, Team, TeamToken
from gateway.storage import Audit, KeyChange, rules
from gateway.storage import rows as model
from gateway.storage.postgresql.core import PostgresCore
from gateway.storage.rows import KEY_COLUMNS, KEY_RECORD_COLUMNS, TEAM_COLUMNS, TOKEN_COLUMNS
from gateway.storage.shared import KEY_INSERT_COLUMNS, NewKey

__all__ = ["PostgresKeys"]


class PostgresKeys(PostgresCore):
    """Store and AdminStore on PostgreSQL."""

    # -- store: keys and teams ----------------------------------------------------

    async def find_key(self, key_hash: str) -> KeyRecord | None:
        row = await self._fetchrow(
            f"SELECT {KEY_RECORD_COLUMNS} "  # noqa: S608 - constant
            "FROM api_keys k JOIN teams t ON t.id = k.team_id WHERE k.key_hash = $1",
            key_hash,
        )
        if row is None:
            return None
        return model.key_record(row)

    async def find_key_id_by_hash(self, key_hash: str) -> str | None:
        found = await self._fetchval("SELECT id FROM api_keys WHERE key_hash = $1", key_hash)
        return None if found is None else str(found)

    async def find_key_hash_by_id(self, key_id: str) -> str | None:
        found = await self._fetchval("SELECT key_hash FROM api_keys WHERE id = $1", key_id)
        return None if found is None else str(found)

    async def latest_key_change(self) -> int:
        return int(await self._fetchval("SELECT seq FROM key_change_counter"))

    async def key_changes_since(self, seq: int) -> tuple[int, list[KeyChange], bool]:
        rows = await self._fetch(
            "SELECT seq, key_hash, team_id FROM key_changes WHERE seq > $1 "
            "ORDER BY seq LIMIT 10000",
            seq,
        )
        return rules.changes_after(seq, [model.key_change(r) for r in rows])

    async def create_team(
        self,
        name: str,
        rate_limit_per_minute: int | None = None,
        *,
        audit: Audit[Team] | None = None,
    ) -> Team:
        try:
            async with self._transaction() as conn:
                row = await conn.fetchrow(
                    "INSERT INTO teams (id, name, rate_limit_per_minute) VALUES ($1, $2, $3) "  # noqa: S608 - constant
                    f"RETURNING {TEAM_COLUMNS}",
                    rules.new_id("team"),
                    name,
                    rate_limit_per_minute,
                )
                assert row is not None
                return await self._write_audit(conn, audit, model.team(row))
        except asyncpg.UniqueViolationError:
            raise rules.team_exists(name) from None

    async def get_team(self, id_or_name: str) -> Team:
        row = await self._fetchrow(
            f"SELECT {TEAM_COLUMNS} FROM teams "  # noqa: S608 - constant
            "WHERE id = $1 OR name = $1 ORDER BY id = $1 DESC LIMIT 1",
            id_or_name,
        )
        if row is None:
            raise rules.no_team(id_or_name)
        return model.team(row)

    async def list_teams(self, limit: int, after: str | None) -> list[Team]:
        rows = await self._fetch(
            f"SELECT {TEAM_COLUMNS} FROM teams "  # noqa: S608 - constant
            "WHERE id > $1 ORDER BY id LIMIT $2",
            after or "",
            limit,
        )
        return [model.team(r) for r in rows]

    async def _insert_key(self, new: NewKey, audit: Audit[ApiKey] | None) -> ApiKey:
        # The trigger on api_keys logs and announces the new key in this transaction.
        try:
            async with self._transaction() as conn:
                row = await conn.fetchrow(
                    f"INSERT INTO api_keys (id, {KEY_INSERT_COLUMNS}, expires_at) "  # noqa: S608 - constant
                    "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) "
                    f"RETURNING {KEY_COLUMNS}",
                    rules.new_id("key"),
                    *new.columns(),
                    new.expires_at,
                )
                assert row is not None
                return await self._write_audit(conn, audit, model.api_key(row))
        except asyncpg.ForeignKeyViolationError:
            raise rules.no_team(new.team_id) from None
        except asyncpg.UniqueViolationError:
            raise rules.key_hash_exists() from None

    async def get_key(self, key_id: str) -> ApiKey:
        row = await self._fetchrow(
            f"SELECT {KEY_COLUMNS} FROM api_keys WHERE id = $1",  # noqa: S608 - constant
            key_id,
        )
        if row is None:
            raise rules.no_key(key_id)
        return model.api_key(row)

    async def list_keys(self, team_id: str, limit: int, after: str | None) -> list[ApiKey]:
        rows = await self._fetch(
            f"SELECT {KEY_COLUMNS} FROM api_keys "  # noqa: S608 - constant
            "WHERE team_id = $1 AND id > $2 ORDER BY id LIMIT $3",
            team_id,
            after or "",
            limit,
        )
        return [model.api_key(r) for r in rows]

    async def revoke_key(self, key_id: str, *, audit: Audit[ApiKey] | None = None) -> ApiKey:
        async with self._transaction() as conn:
            row = await conn.fetchrow(
                "UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL "  # noqa: S608 - constant
                f"RETURNING {KEY_COLUMNS}",
                key_id,
            )
            if row is not None:
                return await self._write_audit(conn, audit, model.api_key(row))
            exists = await conn.fetchval("SELECT 1 FROM api_keys WHERE id = $1", key_id)
        if exists is None:
            raise rules.no_key(key_id)
        raise rules.key_already_revoked(key_id)

    async def update_team(
        self, team_id: str, rate_limit_per_minute: int | None, *, audit: Audit[Team] | None = None
    ) -> Team:
        # The trigger on teams announces a changed limit to every key cache.
        async with self._transaction() as conn:
            row = await conn.fetchrow(
                "UPDATE teams SET rate_limit_per_minute = $2 WHERE id = $1 "  # noqa: S608 - constant
                f"RETURNING {TEAM_COLUMNS}",
                team_id,
                rate_limit_per_minute,
            )
            if row is not None:
                return await self._write_audit(conn, audit, model.team(row))
        raise rules.no_team(team_id)

    async def update_team_quotas(
        self,
        team_id: str,
        quota_per_day: int | None,
        quota_per_month: int | None,
        *,
        audit: Audit[Team] | None = None,
    ) -> Team:
        # The trigger on teams announces changed quotas to every key cache.
        async with self._transaction() as conn:
            row = await conn.fetchrow(
                "UPDATE teams SET quota_per_day = $2, quota_per_month = $3 "  # noqa: S608 - constant
                f"WHERE id = $1 RETURNING {TEAM_COLUMNS}",
                team_id,
                quota_per_day,
                quota_per_month,
            )
            if row is not None:
                return await self._write_audit(conn, audit, model.team(row))
        raise rules.no_team(team_id)

    async def update_key(
        self, key_id: str, changes: Mapping[str, object], *, audit: Audit[ApiKey] | None = None
    ) -> ApiKey:
        # The trigger on api_keys announces a change of what caches hold (limit,
        # expiry, disabled); a new name changes nothing cached.
        checked = rules.checked_key_changes(changes)
        async with self._transaction() as conn:
            if checked:
                # Column names come from KEY_FIELDS only (checked_key_changes).
                assignments = ", ".join(
                    f"{field} = ${n}" for n, field in enumerate(checked, start=2)
                )
                row = await conn.fetchrow(
                    f"UPDATE api_keys SET {assignments} "  # noqa: S608 - checked names
                    f"WHERE id = $1 AND revoked_at IS NULL RETURNING {KEY_COLUMNS}",
                    key_id,
                    *checked.values(),
                )
            else:
                row = await conn.fetchrow(
                    f"SELECT {KEY_COLUMNS} FROM api_keys "  # noqa: S608 - constant
                    "WHERE id = $1 AND revoked_at IS NULL",
                    key_id,
                )
            if row is not None:
                return await self._write_audit(conn, audit, model.api_key(row))
            exists = await conn.fetchval("SELECT 1 FROM api_keys WHERE id = $1", key_id)
        if exists is None:
            raise rules.no_key(key_id)
        raise rules.key_revoked(key_id)

    async def rotate_key(
        self,
        key_id: str,
        new_hash: str,
        new_prefix: str,
        old_expires_at: float,
        *,
        audit: Audit[ApiKey] | None = None,
    ) -> ApiKey:
        # One statement makes both changes; the triggers announce both keys.
        try:
            async with self._transaction() as conn:
                row = await conn.fetchrow(
                    _ROTATE_SQL, key_id, new_hash, new_prefix, old_expires_at, rules.new_id("key")
                )
                if row is not None:
                    return await self._write_audit(conn, audit, model.api_key(row))
                exists = await conn.fetchval("SELECT 1 FROM api_keys WHERE id = $1", key_id)
        except asyncpg.UniqueViolationError:
            raise rules.key_hash_exists() from None
        if exists is None:
            raise rules.no_key(key_id)
        raise rules.key_revoked(key_id)

    # -- admin: team tokens and the audit log -------------------------------------

    async def create_token(
        self,
        team_id: str,
        name: str,
        token_hash: str,
        prefix: str,
        *,
        audit: Audit[TeamToken] | None = None,
    ) -> TeamToken:
        try:
            async with self._transaction() as conn:
                row = await conn.fetchrow(
                    "INSERT INTO team_tokens (id, team_id, name, prefix, token_hash) "  # noqa: S608 - constant
                    f"VALUES ($1, $2, $3, $4, $5) RETURNING {TOKEN_COLUMNS}",
                    rules.new_id("tok"),
                    team_id,
                    name,
                    prefix,
                    token_hash,
                )
                assert row is not None
                return await self._write_audit(conn, audit, model.token(row))
        except asyncpg.ForeignKeyViolationError:
            raise rules.no_team(team_id) from None
        except asyncpg.UniqueViolationError:
            raise rules.token_hash_exists() from None

    async def list_tokens(self, team_id: str, limit: int, after: str | None) -> list[TeamToken]:
        rows = await self._fetch(
            f"SELECT {TOKEN_COLUMNS} FROM team_tokens "  # noqa: S608 - constant
            "WHERE team_id = $1 AND id > $2 ORDER BY id LIMIT $3",
            team_id,
            after or "",
            limit,
        )
        return [model.token(r) for r in rows]

    async def get_token(self, token_id: str) -> TeamToken:
        row = await self._fetchrow(
            f"SELECT {TOKEN_COLUMNS} FROM team_tokens WHERE id = $1",  # noqa: S608 - constant
            token_id,
        )
        if row is None:
            raise rules.no_token(token_id)
        return model.token(row)

    async def revoke_token(
        self, token_id: str, *, audit: Audit[TeamToken] | None = None
    ) -> TeamToken:
        async with self._transaction() as conn:
            row = await conn.fetchrow(
                "UPDATE team_tokens SET revoked_at = now() "  # noqa: S608 - constant
                f"WHERE id = $1 AND revoked_at IS NULL RETURNING {TOKEN_COLUMNS}",
                token_id,
            )
            if row is not None:
                return await self._write_audit(conn, audit, model.token(row))
            exists = await conn.fetchval("SELECT 1 FROM team_tokens WHERE id = $1", token_id)
        if exists is None:
            raise rules.no_token(token_id)
        raise rules.token_already_revoked(token_id)

    async def find_token(self, token_hash: str) -> TeamToken | None:
        row = await self._fetchrow(
            f"SELECT {TOKEN_COLUMNS} FROM team_tokens WHERE token_hash = $1",  # noqa: S608 - constant
            token_hash,
        )
        return None if row is None else model.token(row)

    async def list_audit(
        self, team_id: str | None, limit: int, before: int | None
    ) -> list[AuditEntry]:
        upper = before if before is not None else 2**62
        if team_id is None:
            rows = await self._fetch(
                "SELECT * FROM audit_log WHERE id < $1 ORDER BY id DESC LIMIT $2", upper, limit
            )
        else:
            rows = await self._fetch(
                "SELECT * FROM audit_log WHERE team_id = $1 AND id < $2 ORDER BY id DESC LIMIT $3",
                team_id,
                upper,
                limit,
            )
        return [model.audit(r) for r in rows]


# The old key stops at the earlier of its own expiry and the new one (LEAST
# ignores NULL: a key without expiry gets the new one) only if it is not
# revoked, and the new key is made from what the UPDATE returned: nothing
# happens, or both do.
_ROTATE_SQL = f"""
WITH old AS (
    UPDATE api_keys SET expires_at = least(expires_at, $4)
    WHERE id = $1 AND revoked_at IS NULL
    RETURNING team_id, name, environment, rate_limit_per_minute, credit_cap_per_day,
              credit_cap_per_month, quota_per_day, quota_per_month
)
INSERT INTO api_keys (id, team_id, name, prefix, key_hash, environment, rate_limit_per_minute,
                      credit_cap_per_day, credit_cap_per_month, quota_per_day, quota_per_month)
SELECT $5, team_id, name, $3, $2, environment, rate_limit_per_minute, credit_cap_per_day,
       credit_cap_per_month, quota_per_day, quota_per_month
FROM old
RETURNING {KEY_COLUMNS}
"""  # noqa: S608 - constant
