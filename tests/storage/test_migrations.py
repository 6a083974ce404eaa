"""The migration files, and one schema however a database got to the latest version.

A database made fresh and one made by the oldest release (version 1 only, with
rows in it) and then upgraded must end with the same catalogue, and the old
rows must still read through the backend.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from gateway.storage import Backend, migrations
from gateway.storage.migrations import MigrationFilesError
from tests.storage.conftest import Backends, Databases

Catalogue = dict[str, list[tuple[Any, ...]]]

# What a release knowing version 1 only left behind: its runner's table, as
# every release has made it, and a team with a key and a grant.
TEAM_ID = "team_old"
KEY_ID = "key_old"
KEY_HASH = "hash_old"
GRANTED = 50


async def assert_old_rows_read(db: Backend) -> None:
    key = await db.find_key(KEY_HASH)
    assert key is not None
    assert (key.id, key.team_id, key.prefix, key.environment) == (
        KEY_ID,
        TEAM_ID,
        "gw_live_old",
        "live",
    )
    assert (key.disabled, key.revoked_at, key.expires_at) == (False, None, None)
    team = await db.get_team(TEAM_ID)
    assert team.name == "old team"
    assert [k.id for k in await db.list_keys(TEAM_ID, 10, None)] == [KEY_ID]
    assert await db.balance(TEAM_ID, "live") == GRANTED
    entries = await db.ledger_entries(TEAM_ID, 10, None)
    assert [(e.kind, e.amount, e.reason) for e in entries] == [("grant", GRANTED, "seed")]
    assert await db.reconcile() == []


# -- the loader -----------------------------------------------------------------------


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_the_packaged_versions_run_from_one_without_a_gap(dialect: migrations.Dialect) -> None:
    loaded = migrations.load(dialect)
    assert [m.version for m in loaded] == list(range(1, len(loaded) + 1))
    assert all(m.name and m.sql.strip() for m in loaded)


def write(root: Path, *names: str) -> Path:
    folder = root / "sqlite"
    folder.mkdir()
    for name in names:
        (folder / name).write_text("CREATE TABLE t (x INTEGER);\n")
    return root


def test_the_loader_reads_a_folder_in_version_order(tmp_path: Path) -> None:
    root = write(tmp_path, "0002_second.sql", "0001_first.sql", "README.md")
    assert [(m.version, m.name) for m in migrations.load("sqlite", root)] == [
        (1, "first"),
        (2, "second"),
    ]


def test_the_loader_refuses_a_gap(tmp_path: Path) -> None:
    root = write(tmp_path, "0001_first.sql", "0003_third.sql")
    with pytest.raises(MigrationFilesError, match=r"sqlite/0003_third\.sql: version 2 is missing"):
        migrations.load("sqlite", root)


def test_the_loader_refuses_a_series_not_starting_at_one(tmp_path: Path) -> None:
    root = write(tmp_path, "0002_second.sql")
    with pytest.raises(MigrationFilesError, match=r"sqlite/0002_second\.sql: version 1 is missing"):
        migrations.load("sqlite", root)


def test_the_loader_refuses_a_duplicate_version(tmp_path: Path) -> None:
    root = write(tmp_path, "0001_first.sql", "0001_also_first.sql")
    with pytest.raises(
        MigrationFilesError,
        match=r"sqlite/0001_(also_)?first\.sql: version 1 is taken by sqlite/0001_(also_)?first\.sql",
    ):
        migrations.load("sqlite", root)


def test_the_loader_refuses_a_badly_named_file(tmp_path: Path) -> None:
    root = write(tmp_path, "0001_first.sql", "2_second.sql")
    with pytest.raises(MigrationFilesError, match=r"sqlite/2_second\.sql: .*NNNN_what_it_does"):
        migrations.load("sqlite", root)


def test_the_loader_refuses_an_empty_file(tmp_path: Path) -> None:
    root = write(tmp_path, "0001_first.sql")
    (root / "sqlite" / "0002_nothing.sql").write_text("\n")
    with pytest.raises(MigrationFilesError, match=r"sqlite/0002_nothing\.sql: the file is empty"):
        migrations.load("sqlite", root)


# -- SQLite ---------------------------------------------------------------------------


def sqlite_catalogue(path: Path) -> Catalogue:
    db = sqlite3.connect(path)
    try:
        objects = sorted(
            (kind, name, table, " ".join((sql or "").split()))
            for kind, name, table, sql in db.execute(
                "SELECT type, name, tbl_name, sql FROM sqlite_master"
            )
        )
        columns = sorted(
            (table, *column)
            for kind, table, _, _ in objects
            if kind == "table"
            for column in db.execute(f'PRAGMA table_info("{table}")')
        )
    finally:
        db.close()
    return {"sqlite_master": objects, "table_info": columns}


def sqlite_at_version_one(path: Path) -> None:
    first = migrations.load("sqlite")[0]
    now = time.time()
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("BEGIN")
        db.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            "version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)"
        )
        for statement in first.sql.split(";\n"):
            if statement.strip():
                db.execute(statement)
        db.execute("INSERT INTO schema_migrations VALUES (1, ?)", (now,))
        db.execute(
            "INSERT INTO teams (id, name, created_at) VALUES (?, 'old team', ?)", (TEAM_ID, now)
        )
        db.execute(
            "INSERT INTO api_keys (id, team_id, name, prefix, key_hash, environment, created_at)"
            " VALUES (?, ?, 'old key', 'gw_live_old', ?, 'live', ?)",
            (KEY_ID, TEAM_ID, KEY_HASH, now),
        )
        db.execute("INSERT INTO balances VALUES (?, 'live', ?)", (TEAM_ID, GRANTED))
        db.execute(
            "INSERT INTO credit_entries (team_id, environment, kind, amount, reason, actor,"
            " idempotency_key, created_at) VALUES (?, 'live', 'grant', ?, 'seed', 'admin', 'g1', ?)",
            (TEAM_ID, GRANTED, now),
        )
        db.execute("COMMIT")
    finally:
        db.close()


async def test_sqlite_fresh_and_upgraded_from_version_one_end_identical(tmp_path: Path) -> None:
    latest = [m.version for m in migrations.load("sqlite")]
    fresh = Backends("sqlite", str(tmp_path / "fresh.db"))
    old = Backends("sqlite", str(tmp_path / "old.db"))
    try:
        assert await (await fresh.open(migrate=False)).migrate() == latest
        sqlite_at_version_one(tmp_path / "old.db")
        upgraded = await old.open(migrate=False)
        assert await upgraded.migrate() == latest[1:]
        assert await upgraded.migrate() == []
        await assert_old_rows_read(upgraded)
    finally:
        await fresh.close_all()
        await old.close_all()
    want = sqlite_catalogue(tmp_path / "fresh.db")
    got = sqlite_catalogue(tmp_path / "old.db")
    assert all(want.values())
    assert got == want


# -- PostgreSQL -----------------------------------------------------------------------

_POSTGRES_CATALOGUE = {
    "columns": """
        SELECT table_name, column_name, ordinal_position, data_type, collation_name,
               is_nullable, column_default, is_identity
        FROM information_schema.columns WHERE table_schema = 'public'
        ORDER BY 1, 2""",
    "indexes": """
        SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'
        ORDER BY 1, 2""",
    "constraints": """
        SELECT c.conrelid::regclass::text, c.conname, c.contype, pg_get_constraintdef(c.oid)
        FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace
        WHERE n.nspname = 'public'
        ORDER BY 1, 2""",
    "functions": """
        SELECT p.proname, pg_get_function_identity_arguments(p.oid), pg_get_functiondef(p.oid)
        FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = 'public'
        ORDER BY 1, 2""",
    "triggers": """
        SELECT t.tgrelid::regclass::text, t.tgname, pg_get_triggerdef(t.oid)
        FROM pg_trigger t JOIN pg_class r ON r.oid = t.tgrelid
        JOIN pg_namespace n ON n.oid = r.relnamespace
        WHERE n.nspname = 'public' AND NOT t.tgisinternal
        ORDER BY 1, 2""",
    "relations": """
        SELECT r.relname, r.relkind, r.reloptions
        FROM pg_class r JOIN pg_namespace n ON n.oid = r.relnamespace
        WHERE n.nspname = 'public'
        ORDER BY 1""",
}


async def postgres_catalogue(dsn: str) -> Catalogue:
    conn = await asyncpg.connect(dsn)
    try:
        return {
            part: [tuple(row) for row in await conn.fetch(query)]
            for part, query in _POSTGRES_CATALOGUE.items()
        }
    finally:
        await conn.close()


async def postgres_at_version_one(dsn: str) -> None:
    first = migrations.load("postgresql")[0]
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                "version integer PRIMARY KEY, "
                "applied_at timestamptz NOT NULL DEFAULT now())"
            )
            await conn.execute(first.sql)
            await conn.execute("INSERT INTO schema_migrations (version) VALUES (1)")
            await conn.execute("INSERT INTO teams (id, name) VALUES ($1, 'old team')", TEAM_ID)
            await conn.execute(
                "INSERT INTO api_keys (id, team_id, name, prefix, key_hash, environment)"
                " VALUES ($1, $2, 'old key', 'gw_live_old', $3, 'live')",
                KEY_ID,
                TEAM_ID,
                KEY_HASH,
            )
            await conn.execute("INSERT INTO balances VALUES ($1, 'live', $2)", TEAM_ID, GRANTED)
            await conn.execute(
                "INSERT INTO credit_entries (team_id, environment, kind, amount, reason, actor,"
                " idempotency_key) VALUES ($1, 'live', 'grant', $2, 'seed', 'admin', 'g1')",
                TEAM_ID,
                GRANTED,
            )
    finally:
        await conn.close()


async def test_postgres_fresh_and_upgraded_from_version_one_end_identical(
    databases: Databases,
) -> None:
    latest = [m.version for m in migrations.load("postgresql")]
    fresh = Backends("postgres", await databases.blank())
    old = Backends("postgres", await databases.blank())
    try:
        assert await (await fresh.open(migrate=False)).migrate() == latest
        await postgres_at_version_one(old.location)
        upgraded = await old.open(migrate=False)
        assert await upgraded.migrate() == latest[1:]
        assert await upgraded.migrate() == []
        await assert_old_rows_read(upgraded)
    finally:
        await fresh.close_all()
        await old.close_all()
    want = await postgres_catalogue(fresh.location)
    got = await postgres_catalogue(old.location)
    assert all(want.values())
    for part in _POSTGRES_CATALOGUE:
        assert got[part] == want[part], part
