"""The audit log: written here and nowhere else, once per real change."""

from __future__ import annotations

from gateway.manage.actors import Actor
from gateway.storage import AdminStore

__all__ = ["AuditLog"]


class AuditLog:
    def __init__(self, store: AdminStore) -> None:
        self._store = store

    async def record(
        self,
        actor: Actor,
        action: str,
        target: str | None,
        team_id: str | None,
        details: dict[str, object] | None = None,
    ) -> None:
        """One entry for a change that was made (never for a replay or a refusal).

        Written right after the change, not in its transaction: the store's
        mutating methods do not take an audit row yet.
        """
        entry = dict(details or {})
        if actor.via is not None:
            entry["via"] = actor.via
        await self._store.append_audit(actor.label, action, target, team_id, actor.client_ip, entry)
