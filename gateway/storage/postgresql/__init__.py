"""The shared backend: store and ledger on PostgreSQL, through an asyncpg pool.

Same semantics as :mod:`gateway.storage.sqlite`, made safe for many replicas.
One class per area (keys, key change listening, usage, request log, ledger,
idempotency,
plans, events) over a shared core that owns the pool; :class:`PostgresBackend` is all of them.
"""

from __future__ import annotations

from gateway.storage.postgresql.events import PostgresEvents
from gateway.storage.postgresql.idempotency import PostgresIdempotency
from gateway.storage.postgresql.keys import PostgresKeys
from gateway.storage.postgresql.ledger import PostgresLedger
from gateway.storage.postgresql.listen import NOTIFY_CHANNEL, PostgresListen
from gateway.storage.postgresql.plans import PostgresPlans
from gateway.storage.postgresql.quotas import PostgresQuotas
from gateway.storage.postgresql.requests import PostgresRequests
from gateway.storage.postgresql.usage import PostgresUsage

__all__ = ["NOTIFY_CHANNEL", "PostgresBackend"]


class PostgresBackend(
    PostgresKeys,
    PostgresListen,
    PostgresUsage,
    PostgresRequests,
    PostgresLedger,
    PostgresIdempotency,
    PostgresPlans,
    PostgresQuotas,
    PostgresEvents,
):
    """Store and ledger on PostgreSQL; any number of replicas may share the database."""
