"""SQLite: keys and their change feed, team tokens, the audit log."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Mapping

from gateway.models import ApiKey, AuditEntry, KeyRecord, TeamToken
from gateway.storage import KEY_LIMIT_FIELDS, Audit, KeyChange, rules
from gateway.storage import rows as model
from gateway.storage.rows import CACHED_KEY_FIELDS, KEY_COLUMNS, KEY_RECORD_COLUMNS, TOKEN_COLUMNS
from gateway.storage.shared import KEY_INSERT_COLUMNS, NewKey
from gateway.storage.sqlite.core import SqliteCore

__all__ = ["SqliteKeys", "log_key_change"]

_CHANGE_RETENTION_SECONDS = 3600.0


def log_key_change(db: sqlite3.Connection, key_hash: str | None, team_id: str | None) -> None:
    """Tell the key caches (which poll ``key_changes``) that a key or a team's keys changed."""
    now = time.time()
    db.execute(
        "INSERT INTO key_changes (key_hash, team_id, changed_at) VALUES (?, ?, ?)",
        (key_hash, team_id, now),
    )
    db.execute(
        "DELETE FROM key_changes WHERE changed_at < ? AND seq < (SELECT MAX(seq) FROM key_changes)",
        (now - _CHANGE_RETENTION_SECONDS,),
    )


class SqliteKeys(SqliteCore):
    """Store (keys) and AdminStore on SQLite."""

    # -- store: keys ----------------------------------------------------

    async def find_key(self, key_hash: str) -> KeyRecord | None:
        return await self._run(self._find_key, key_hash)

    def _find_key(self, key_hash: str) -> KeyRecord | None:
        row = self._db.execute(
            f"SELECT {KEY_RECORD_COLUMNS} "  # noqa: S608 - constant
            "FROM api_keys k JOIN teams t ON t.id = k.team_id WHERE k.key_hash = ?",
            (key_hash,),
        ).fetchone()
        if row is None:
            return None
        return model.key_record(row)

    async def find_key_id_by_hash(self, key_hash: str) -> str | None:
        row = await self._run(
            lambda: self._db.execute(
                "SELECT id FROM api_keys WHERE key_hash = ?", (key_hash,)
            ).fetchone()
        )
        return None if row is None else str(row["id"])

    async def find_key_hash_by_id(self, key_id: str) -> str | None:
        row = await self._run(
            lambda: self._db.execute(
                "SELECT key_hash FROM api_keys WHERE id = ?", (key_id,)
            ).fetchone()
        )
        return None if row is None else str(row["key_hash"])

    async def latest_key_change(self) -> int:
        row = await self._run(
            lambda: self._db.execute(
                "SELECT COALESCE(MAX(seq), 0) AS s FROM key_changes"
            ).fetchone()
        )
        return int(row["s"])

    async def key_changes_since(self, seq: int) -> tuple[int, list[KeyChange], bool]:
        return await self._run(self._key_changes_since, seq)

    def _key_changes_since(self, seq: int) -> tuple[int, list[KeyChange], bool]:
        rows = self._db.execute(
            "SELECT seq, key_hash, team_id FROM key_changes WHERE seq > ? ORDER BY seq LIMIT 10000",
            (seq,),
        ).fetchall()
        return rules.changes_after(seq, [model.key_change(r) for r in rows])

    async def _insert_key(self, new: NewKey, audit: Audit[ApiKey] | None) -> ApiKey:
        key = ApiKey(
            id=rules.new_id("key"),
            team_id=new.team_id,
            name=new.name,
            prefix=new.prefix,
            environment=new.environment,
            rate_limit_per_minute=new.rate_limit_per_minute,
            disabled=False,
            created_at=time.time(),
            last_used_at=None,
            expires_at=new.expires_at,
            revoked_at=None,
            **dict(zip(KEY_LIMIT_FIELDS, new.limits, strict=True)),
        )

        def insert(db: sqlite3.Connection) -> ApiKey:
            if db.execute("SELECT 1 FROM teams WHERE id = ?", (new.team_id,)).fetchone() is None:
                raise rules.no_team(new.team_id)
            db.execute(
                f"INSERT INTO api_keys (id, {KEY_INSERT_COLUMNS}, disabled, created_at, "  # noqa: S608 - constant
                "expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?)",
                (key.id, *new.columns(), key.created_at, new.expires_at),
            )
            # A new key may have been looked up (and cached as unknown) before it existed.
            log_key_change(db, new.key_hash, None)
            return self._write_audit(db, audit, key)

        return await self._run(self._tx, insert)

    async def get_key(self, key_id: str) -> ApiKey:
        row = await self._run(
            lambda: self._db.execute(
                f"SELECT {KEY_COLUMNS} FROM api_keys WHERE id = ?",  # noqa: S608 - constant
                (key_id,),
            ).fetchone()
        )
        if row is None:
            raise rules.no_key(key_id)
        return model.api_key(row)

    async def list_keys(self, team_id: str, limit: int, after: str | None) -> list[ApiKey]:
        rows = await self._run(
            lambda: self._db.execute(
                f"SELECT {KEY_COLUMNS} FROM api_keys "  # noqa: S608 - constant
                "WHERE team_id = ? AND id > ? ORDER BY id LIMIT ?",
                (team_id, after or "", limit),
            ).fetchall()
        )
        return [model.api_key(r) for r in rows]

    async def revoke_key(self, key_id: str, *, audit: Audit[ApiKey] | None = None) -> ApiKey:
        def revoke(db: sqlite3.Connection) -> ApiKey:
            row = db.execute(
                "UPDATE api_keys SET revoked_at = ? "  # noqa: S608 - constant
                f"WHERE id = ? AND revoked_at IS NULL RETURNING key_hash, {KEY_COLUMNS}",
                (time.time(), key_id),
            ).fetchone()
            if row is None:
                if db.execute("SELECT 1 FROM api_keys WHERE id = ?", (key_id,)).fetchone():
                    raise rules.key_already_revoked(key_id)
                raise rules.no_key(key_id)
            log_key_change(db, row["key_hash"], None)
            return self._write_audit(db, audit, model.api_key(row))

        return await self._run(self._tx, revoke)

    async def update_key(
        self, key_id: str, changes: Mapping[str, object], *, audit: Audit[ApiKey] | None = None
    ) -> ApiKey:
        checked = rules.checked_key_changes(changes)
        values = {
            field: int(value) if isinstance(value, bool) else value
            for field, value in checked.items()
        }

        def update(db: sqlite3.Connection) -> ApiKey:
            old = db.execute(
                f"SELECT key_hash, {KEY_COLUMNS} FROM api_keys WHERE id = ?",  # noqa: S608 - constant
                (key_id,),
            ).fetchone()
            if old is None:
                raise rules.no_key(key_id)
            if old["revoked_at"] is not None:
                raise rules.key_revoked(key_id)
            if not values:
                return model.api_key(old)
            # Column names come from KEY_FIELDS only (checked_key_changes).
            assignments = ", ".join(f"{field} = ?" for field in values)
            new = db.execute(
                f"UPDATE api_keys SET {assignments} WHERE id = ? "  # noqa: S608 - checked names
                f"RETURNING {KEY_COLUMNS}",
                (*values.values(), key_id),
            ).fetchone()
            if any(old[f] != new[f] for f in CACHED_KEY_FIELDS):
                log_key_change(db, old["key_hash"], None)
            return self._write_audit(db, audit, model.api_key(new))

        return await self._run(self._tx, update)

    async def rotate_key(
        self,
        key_id: str,
        new_hash: str,
        new_prefix: str,
        old_expires_at: float,
        *,
        audit: Audit[ApiKey] | None = None,
    ) -> ApiKey:
        fresh_id = rules.new_id("key")
        now = time.time()

        def rotate(db: sqlite3.Connection) -> ApiKey:
            old = db.execute(
                "SELECT key_hash, team_id, name, environment, rate_limit_per_minute, "
                "credit_cap_per_day, credit_cap_per_month, quota_per_day, quota_per_month, "
                "expires_at, revoked_at FROM api_keys WHERE id = ?",
                (key_id,),
            ).fetchone()
            if old is None:
                raise rules.no_key(key_id)
            if old["revoked_at"] is not None:
                raise rules.key_revoked(key_id)
            try:
                new = db.execute(
                    "INSERT INTO api_keys (id, team_id, name, prefix, key_hash, environment, "  # noqa: S608 - constant
                    "rate_limit_per_minute, credit_cap_per_day, credit_cap_per_month, "
                    "quota_per_day, quota_per_month, disabled, created_at) "
                    f"VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?) RETURNING {KEY_COLUMNS}",
                    (
                        fresh_id,
                        old["team_id"],
                        old["name"],
                        new_prefix,
                        new_hash,
                        old["environment"],
                        old["rate_limit_per_minute"],
                        old["credit_cap_per_day"],
                        old["credit_cap_per_month"],
                        old["quota_per_day"],
                        old["quota_per_month"],
                        now,
                    ),
                ).fetchone()
            except sqlite3.IntegrityError:
                raise rules.key_hash_exists() from None
            log_key_change(db, new_hash, None)
            expires = old_expires_at
            if old["expires_at"] is not None:
                expires = min(old["expires_at"], old_expires_at)
            if expires != old["expires_at"]:
                db.execute("UPDATE api_keys SET expires_at = ? WHERE id = ?", (expires, key_id))
                log_key_change(db, old["key_hash"], None)
            return self._write_audit(db, audit, model.api_key(new))

        return await self._run(self._tx, rotate)

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
        token = TeamToken(rules.new_id("tok"), team_id, name, prefix, time.time(), None, None)

        def insert(db: sqlite3.Connection) -> TeamToken:
            if db.execute("SELECT 1 FROM teams WHERE id = ?", (team_id,)).fetchone() is None:
                raise rules.no_team(team_id)
            try:
                db.execute(
                    "INSERT INTO team_tokens (id, team_id, name, prefix, token_hash, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (token.id, team_id, name, prefix, token_hash, token.created_at),
                )
            except sqlite3.IntegrityError:
                raise rules.token_hash_exists() from None
            return self._write_audit(db, audit, token)

        return await self._run(self._tx, insert)

    async def list_tokens(self, team_id: str, limit: int, after: str | None) -> list[TeamToken]:
        rows = await self._run(
            lambda: self._db.execute(
                f"SELECT {TOKEN_COLUMNS} FROM team_tokens "  # noqa: S608 - constant
                "WHERE team_id = ? AND id > ? ORDER BY id LIMIT ?",
                (team_id, after or "", limit),
            ).fetchall()
        )
        return [model.token(r) for r in rows]

    async def get_token(self, token_id: str) -> TeamToken:
        row = await self._run(
            lambda: self._db.execute(
                f"SELECT {TOKEN_COLUMNS} FROM team_tokens WHERE id = ?",  # noqa: S608 - constant
                (token_id,),
            ).fetchone()
        )
        if row is None:
            raise rules.no_token(token_id)
        return model.token(row)

    async def revoke_token(
        self, token_id: str, *, audit: Audit[TeamToken] | None = None
    ) -> TeamToken:
        def revoke(db: sqlite3.Connection) -> TeamToken:
            row = db.execute(
                "UPDATE team_tokens SET revoked_at = ? "  # noqa: S608 - constant
                f"WHERE id = ? AND revoked_at IS NULL RETURNING {TOKEN_COLUMNS}",
                (time.time(), token_id),
            ).fetchone()
            if row is not None:
                return self._write_audit(db, audit, model.token(row))
            if db.execute("SELECT 1 FROM team_tokens WHERE id = ?", (token_id,)).fetchone():
                raise rules.token_already_revoked(token_id)
            raise rules.no_token(token_id)

        return await self._run(self._tx, revoke)

    async def find_token(self, token_hash: str) -> TeamToken | None:
        row = await self._run(
            lambda: self._db.execute(
                f"SELECT {TOKEN_COLUMNS} FROM team_tokens WHERE token_hash = ?",  # noqa: S608 - constant
                (token_hash,),
            ).fetchone()
        )
        return None if row is None else model.token(row)

    async def list_audit(
        self, team_id: str | None, limit: int, before: int | None
    ) -> list[AuditEntry]:
        upper = before if before is not None else 2**62
        if team_id is None:
            query = "SELECT * FROM audit_log WHERE id < ? ORDER BY id DESC LIMIT ?"
            args: tuple[object, ...] = (upper, limit)
        else:
            query = "SELECT * FROM audit_log WHERE team_id = ? AND id < ? ORDER BY id DESC LIMIT ?"
            args = (team_id, upper, limit)
        rows = await self._run(lambda: self._db.execute(query, args).fetchall())
        return [model.audit(r) for r in rows]
