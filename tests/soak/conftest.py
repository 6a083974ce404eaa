"""The soak suite's fixtures: the fault suite's, a PostgreSQL database and a Redis of its own."""

from __future__ import annotations

from tests.faults.fixtures import fault_upstream, session, spawn, throwaway_redis
from tests.storage.conftest import databases, postgres_admin_dsn, postgres_dsn, postgres_template

__all__ = [
    "databases",
    "fault_upstream",
    "postgres_admin_dsn",
    "postgres_dsn",
    "postgres_template",
    "session",
    "spawn",
    "throwaway_redis",
]
