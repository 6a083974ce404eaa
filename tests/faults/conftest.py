"""The fault suite's fixtures: real processes only, all stopped whatever happens."""

from __future__ import annotations

from tests.storage.conftest import databases, postgres_admin_dsn, postgres_dsn, postgres_template

from .fixtures import fault_upstream, pg_cluster, session, spawn, throwaway_redis

__all__ = [
    "databases",
    "fault_upstream",
    "pg_cluster",
    "postgres_admin_dsn",
    "postgres_dsn",
    "postgres_template",
    "session",
    "spawn",
    "throwaway_redis",
]
