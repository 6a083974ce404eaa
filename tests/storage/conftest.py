"""Storage fixtures: a database of its own for every test, on both backends.

SQLite gets a file in the test's tmp_path. PostgreSQL (the shared test server,
``GATEWAY_TEST_POSTGRES_DSN``) gets a database copied from a template that is
migrated once per session: ``CREATE DATABASE ... TEMPLATE`` takes a few tens
of milliseconds, a full migration far longer. Every database is dropped after
its test, however the test ends.
"""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from collections.abc import AsyncIterator, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from gateway.config import PostgresSettings
from gateway.storage import Backend
from gateway.storage.postgresql import PostgresBackend
from gateway.storage.sqlite import SqliteBackend
from tests import services

Kind = Literal["sqlite", "postgres"]
T = TypeVar("T")


def with_database(dsn: str, name: str) -> str:
    """``dsn`` pointing at database ``name`` instead."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + name))


def in_thread(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to the end on a loop of its own, off the test's loop and thread.

    Session fixtures are set up while a test's loop may be running; asyncio.run
    there would refuse (or unset the test's loop), so they work in a thread.
    """
    result: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            result.append(asyncio.run(coro))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, name="pg-fixture")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return result[0]


async def create_database(admin_dsn: str, name: str, template: str = "template0") -> str:
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    finally:
        await admin.close()
    return with_database(admin_dsn, name)


async def drop_database(admin_dsn: str, name: str) -> None:
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


def unique_name(what: str) -> str:
    return f"gateway_test_{what}_{os.getpid()}_{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def postgres_admin_dsn() -> str:
    """The shared server's maintenance DSN; fails the test loudly when nobody answers."""
    dsn = services.postgres_dsn()

    async def probe() -> None:
        conn = await asyncpg.connect(dsn, timeout=5)
        await conn.close()

    try:
        in_thread(probe())
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.fail(
            f"no PostgreSQL answers at {dsn} ({services.POSTGRES_DSN_ENV}): {exc}; "
            "run the tests through scripts/test, which starts one"
        )
    return dsn


@pytest.fixture(scope="session")
def postgres_template(postgres_admin_dsn: str) -> Iterator[str]:
    """A database migrated once, copied for every test that needs a migrated one."""
    name = unique_name("template")

    async def build() -> None:
        dsn = await create_database(postgres_admin_dsn, name)
        backend = PostgresBackend(dsn, PostgresSettings(pool_min_size=1), lease_seconds=60)
        await backend.open()
        try:
            await backend.migrate()
        finally:
            await backend.close()

    in_thread(build())
    yield name
    in_thread(drop_database(postgres_admin_dsn, name))


@dataclass
class Databases:
    """Creates databases on the shared server for one test and drops them afterwards."""

    admin_dsn: str
    template: str
    made: list[str] = field(default_factory=list)

    async def migrated(self) -> str:
        name = unique_name("db")
        self.made.append(name)
        return await create_database(self.admin_dsn, name, self.template)

    async def blank(self) -> str:
        name = unique_name("blank")
        self.made.append(name)
        return await create_database(self.admin_dsn, name)

    async def drop_all(self) -> None:
        for name in self.made:
            await drop_database(self.admin_dsn, name)


@pytest.fixture
async def databases(postgres_admin_dsn: str, postgres_template: str) -> AsyncIterator[Databases]:
    made = Databases(postgres_admin_dsn, postgres_template)
    try:
        yield made
    finally:
        await made.drop_all()


@pytest.fixture
async def postgres_dsn(databases: Databases) -> str:
    """A migrated database of this test's own."""
    return await databases.migrated()


@dataclass
class Backends:
    """Opens backends (like replicas) on this test's database, and closes them afterwards."""

    kind: Kind
    # The SQLite file, or the PostgreSQL database's DSN.
    location: str
    opened: list[Backend] = field(default_factory=list)

    async def open(
        self, *, lease_seconds: float = 60.0, migrate: bool = True, **postgres: Any
    ) -> Backend:
        backend: Backend
        if self.kind == "sqlite":
            backend = SqliteBackend(self.location, lease_seconds=lease_seconds)
        else:
            settings = PostgresSettings(**{"pool_min_size": 1, **postgres})
            backend = PostgresBackend(self.location, settings, lease_seconds=lease_seconds)
        await backend.open()
        self.opened.append(backend)
        if migrate:
            await backend.migrate()
        return backend

    async def close_all(self) -> None:
        for backend in reversed(self.opened):
            await backend.close()


@pytest.fixture(params=["sqlite", "postgres"])
async def backends(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backends]:
    """The contract tests' fixture: every test runs once per backend."""
    kind: Kind = request.param
    if kind == "sqlite":
        made = Backends(kind, str(tmp_path / "ledger.db"))
        try:
            yield made
        finally:
            await made.close_all()
        return
    dbs = Databases(
        request.getfixturevalue("postgres_admin_dsn"),
        request.getfixturevalue("postgres_template"),
    )
    try:
        made = Backends(kind, await dbs.migrated())
        try:
            yield made
        finally:
            await made.close_all()
    finally:
        await dbs.drop_all()


@pytest.fixture
async def db(backends: Backends) -> Backend:
    return await backends.open()
