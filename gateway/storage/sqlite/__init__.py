"""The embedded backend: store and ledger in one SQLite file.

One class per area (teams, keys, usage, request log, ledger, idempotency, plans,
events) over a shared core that
owns the connection; :class:`SqliteBackend` is all of them.
"""

from __future__ import annotations

from gateway.storage.sqlite.events import SqliteEvents
from gateway.storage.sqlite.idempotency import SqliteIdempotency
from gateway.storage.sqlite.keys import SqliteKeys
from gateway.storage.sqlite.ledger import SqliteLedger
from gateway.storage.sqlite.plans import SqlitePlans
from gateway.storage.sqlite.quotas import SqliteQuotas
from gateway.storage.sqlite.requests import SqliteRequests
from gateway.storage.sqlite.teams import SqliteTeams
from gateway.storage.sqlite.usage import SqliteUsage

__all__ = ["SqliteBackend"]


class SqliteBackend(
    SqliteTeams,
    SqliteKeys,
    SqliteUsage,
    SqliteRequests,
    SqliteLedger,
    SqliteIdempotency,
    SqlitePlans,
    SqliteQuotas,
    SqliteEvents,
):
    """Store and ledger on SQLite; safe to share the file with CLI processes (WAL)."""
