"""The one place a ``storage`` URL becomes a concrete backend.

``gateway.app`` and the CLI both open their store here, so they cannot pick
differently. Each backend module is imported only when its scheme is asked
for: a SQLite deployment never loads asyncpg.
"""

from __future__ import annotations

from collections.abc import Callable

from gateway.config import PostgresSettings
from gateway.storage import Backend, StorageError

__all__ = ["open_backend"]

_Opener = Callable[[str, float, PostgresSettings | None], Backend]


def _sqlite(url: str, lease_seconds: float, postgres: PostgresSettings | None) -> Backend:
    from gateway.storage.sqlite import SqliteBackend

    return SqliteBackend(url.removeprefix("sqlite:///"), lease_seconds=lease_seconds)


def _postgres(url: str, lease_seconds: float, postgres: PostgresSettings | None) -> Backend:
    from gateway.storage.postgresql import PostgresBackend

    settings = postgres if postgres is not None else PostgresSettings()
    return PostgresBackend(url, settings, lease_seconds=lease_seconds)


# URL prefix → opener; the first prefix the URL starts with wins.
_OPENERS: dict[str, _Opener] = {
    "sqlite:///": _sqlite,
    "postgresql://": _postgres,
    "postgres://": _postgres,
}


def open_backend(
    url: str, *, lease_seconds: float, postgres: PostgresSettings | None = None
) -> Backend:
    """The backend named by a ``storage`` URL (not yet opened).

    ``postgres`` tunes a PostgreSQL backend (pool, timeouts, LISTEN DSN) and
    is ignored for SQLite.
    """
    for prefix, opener in _OPENERS.items():
        if url.startswith(prefix):
            return opener(url, lease_seconds, postgres)
    raise StorageError(f"storage backend {url.split(':', 1)[0]!r} is not available in this build")
