"""The audit log's entries: said here and nowhere else, once per real change.

The store writes an entry in the transaction of the change it records (see
``gateway.storage.Store``): a change that rolls back leaves no entry, and an
entry never stands for a change that did not happen. A replay changes nothing
and writes none. What a change tells webhook endpoints (``tells``) is said here
too and written with the entry, so an event never outlives a rolled-back change.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar

from gateway.manage.actors import Actor
from gateway.storage import AuditRecord, EventRecord

__all__ = ["Said", "audit"]

_R = TypeVar("_R")

# What an entry says of a change, from what the change made: (target, team id, details).
Said = tuple[str | None, str | None, Mapping[str, object]]


def audit(
    actor: Actor,
    action: str,
    said: Callable[[_R], Said],
    *,
    tells: Callable[[_R], EventRecord | None] | None = None,
) -> Callable[[_R], AuditRecord]:
    """The entry the store is to write, in its transaction, for the change it makes,
    with the event the change tells (if any)."""

    def entry(made: _R) -> AuditRecord:
        target, team_id, details = said(made)
        if actor.via is not None:
            details = {**details, "via": actor.via}
        told = tells(made) if tells is not None else None
        events = () if told is None else (told,)
        return AuditRecord(actor.label, action, target, team_id, actor.client_ip, details, events)

    return entry
