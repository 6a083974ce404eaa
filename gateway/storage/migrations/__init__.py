"""The schema's versions, as ``.sql`` files per dialect: ``<dialect>/NNNN_name.sql``.

A version, once released, is never edited: a change is a new file with the
next number. Each backend's ``migrate()`` applies the versions it has not
recorded yet, in order, each in one transaction, and records its number in
``schema_migrations``.

The files are read with :mod:`importlib.resources`, so they are found inside
an installed wheel as well as in a checkout. The folders are data, not Python
packages; ``pyproject.toml`` ships them with the ``**/*.sql`` package data.

SQLite scripts are split into statements at ``;`` followed by a newline
(a trigger body keeps its ``;`` on the same line as its ``END``). PostgreSQL
keeps times as timestamptz (the backend hands them out as epoch seconds) and
ids in the "C" collation, so that cursors page in the same byte order as on
SQLite; its ledger writes are functions, so that a batch is one statement,
hence one round trip, whatever its size.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib.resources import files
from importlib.resources.abc import Traversable
from typing import Literal

__all__ = ["Dialect", "Migration", "MigrationFilesError", "load"]

Dialect = Literal["sqlite", "postgresql"]

_FILE_NAME = re.compile(r"(?P<version>[0-9]{4})_(?P<name>[a-z0-9]+(?:_[a-z0-9]+)*)\.sql")


@dataclass(frozen=True, slots=True)
class Migration:
    """One version of the schema: its number, what it does, and its script."""

    version: int
    name: str
    sql: str


class MigrationFilesError(Exception):
    """The migration files are not a contiguous, uniquely numbered series (a build bug)."""


def load(dialect: Dialect, root: Traversable | None = None) -> list[Migration]:
    """Every migration of ``dialect``, by version, checked to run 1, 2, 3... without a gap.

    ``root`` holds one folder per dialect; by default this package's own.
    Raises :class:`MigrationFilesError` naming the offending file.
    """
    folder = (root if root is not None else files(__name__)) / dialect
    if not folder.is_dir():
        raise MigrationFilesError(f"no migrations folder for {dialect!r}: {folder}")
    found: dict[int, Migration] = {}
    sources: dict[int, str] = {}
    for entry in folder.iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = _FILE_NAME.fullmatch(entry.name)
        if match is None:
            raise MigrationFilesError(
                f"{dialect}/{entry.name}: a migration is named NNNN_what_it_does.sql"
            )
        version = int(match["version"])
        if version in found:
            taken_by = sources[version]
            raise MigrationFilesError(
                f"{dialect}/{entry.name}: version {version} is taken by {dialect}/{taken_by}"
            )
        sql = entry.read_text(encoding="utf-8")
        if not sql.strip():
            raise MigrationFilesError(f"{dialect}/{entry.name}: the file is empty")
        found[version] = Migration(version, match["name"], sql)
        sources[version] = entry.name
    migrations = [found[version] for version in sorted(found)]
    for expected, migration in enumerate(migrations, start=1):
        if migration.version != expected:
            raise MigrationFilesError(
                f"{dialect}/{sources[migration.version]}: version {expected} is missing "
                f"(versions run 1, 2, 3... without a gap)"
            )
    if not migrations:
        raise MigrationFilesError(f"no migrations in {dialect}/")
    return migrations
