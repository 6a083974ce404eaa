"""How many of a key's requests may reserve credit before their rate-limit decision is back.

On a remote limiter the pipeline can send a request's credit reservation at
the same time as its limit decision: two round trips in parallel instead of
one after the other. That only pays when the decision will admit the
request; a refused one has to void what it reserved. So each key gets a
budget: the room its last decision reported (tokens left in every bucket,
zero once any of them is spent). Each overlapped request takes one from it;
with none left, requests are decided first and reserve only when admitted.
A key seen for the first time gets one request overlapped while its first
decision is out.

So a client hammering past its limit costs the ledger nothing: its decisions
report no room. What can be wasted (reserved, then voided at once, never
charged) is bounded by staleness: requests already overlapped when another
replica spent the key's room, at most the key's concurrent requests, once
each time the key has room again.

The budgets are kept for the most recently decided keys only (a bounded,
least-recently-updated-first dict); a key forgotten is a key seen anew.
"""

from __future__ import annotations

from gateway.limiter import Decision

__all__ = ["ReserveAhead"]


class ReserveAhead:
    """Per key id, how many requests may still reserve before their decision."""

    def __init__(self, capacity: int = 50_000) -> None:
        self._room: dict[str, int] = {}
        self._capacity = capacity

    def take(self, key_id: str) -> bool:
        """Whether this request of ``key_id`` may reserve now (and count it if so)."""
        room = self._room.get(key_id)
        if room is None:
            # Unknown: this one goes ahead, the rest wait for its decision.
            self._remember(key_id, 0)
            return True
        if room > 0:
            self._room[key_id] = room - 1
            return True
        return False

    def saw(self, key_id: str, decision: Decision) -> None:
        """Take the room the limiter just reported for ``key_id``."""
        # The room of every bucket, the team's too: a key with room in a team
        # that has none would otherwise reserve for requests its team refuses.
        self._remember(key_id, decision.room if decision.allowed else 0)

    def _remember(self, key_id: str, room: int) -> None:
        # Re-inserted, so the dict's order is the order of last decisions.
        self._room.pop(key_id, None)
        self._room[key_id] = room
        if len(self._room) > self._capacity:
            del self._room[next(iter(self._room))]

    def __len__(self) -> int:
        return len(self._room)
