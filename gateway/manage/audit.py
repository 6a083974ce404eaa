"""The audit log's entries: said here and nowhere else, once per real change.

The store writes an entry in the transaction of the change it records (see
``gateway.storage.Store``): a change that rolls back leaves no entry, and an
entry never stands for a change that did not happen. A replay changes nothing
and writes none.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar

from gateway.manage.actors import Actor
from gateway.storage import AuditRecord

__all__ = ["Said", "audit"]

_R = TypeVar("_R")

# What an entry says of a change, from what the change made: (target, team id, details).
Said = tuple[str | None, str | None, Mapping[str, object]]


def audit(actor: Actor, action: str, said: Callable[[_R], Said]) -> Callable[[_R], AuditRecord]:
    """The entry the store is to write, in its transaction, for the change it makes."""

    def entry(made: _R) -> AuditRecord:
        target, team_id, details = said(made)
        if actor.via is not None:
            details = {**details, "via": actor.via}
        return AuditRecord(actor.label, action, target, team_id, actor.client_ip, details)

    return entry
