"""Console sessions: random ids in a cookie, everything else in this process's memory.

The session never holds the token that signed in: an operator's session holds the
``Actor``, a team token's session its token id (checked on every request, so a
revoked token ends its sessions at once). A restart signs everybody out, which
is the price of keeping nothing about sessions on disk.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from gateway.manage import Actor

__all__ = ["LIFETIME_SECONDS", "Session", "SessionStore"]

LIFETIME_SECONDS = 8 * 3600
IDLE_SECONDS = 3600
MAX_SESSIONS = 10_000
# Forms that reveal a secret or move credits carry a one-time nonce, so a reload
# or a double click does not create a second key; this many are kept per session.
MAX_NONCES = 32


@dataclass(slots=True)
class Session:
    actor: Actor
    who: str  # how the header names the signed-in party
    csrf: str
    expires_at: float  # monotonic clock
    last_seen: float
    flashes: list[tuple[str, str]] = field(default_factory=list)
    nonces: OrderedDict[str, None] = field(default_factory=OrderedDict)

    def flash(self, kind: str, text: str) -> None:
        """A message for the next page (``kind`` is ``ok`` or ``error``); never a secret."""
        self.flashes.append((kind, text))

    def take_flashes(self) -> list[tuple[str, str]]:
        taken, self.flashes = self.flashes, []
        return taken

    def issue_nonce(self) -> str:
        nonce = secrets.token_urlsafe(16)
        self.nonces[nonce] = None
        while len(self.nonces) > MAX_NONCES:
            self.nonces.popitem(last=False)
        return nonce

    def spend_nonce(self, nonce: str) -> bool:
        """True the first time a nonce this session issued comes back, False after."""
        if nonce not in self.nonces:
            return False
        del self.nonces[nonce]
        return True


def _digest(session_id: str) -> bytes:
    # Kept by digest: a memory dump of the process does not hand out live cookies.
    return hashlib.sha256(session_id.encode()).digest()


class SessionStore:
    """Sessions by id, bounded; each ends after ``lifetime`` or ``idle`` seconds."""

    def __init__(
        self,
        *,
        lifetime: float = LIFETIME_SECONDS,
        idle: float = IDLE_SECONDS,
        max_sessions: int = MAX_SESSIONS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.lifetime = lifetime
        self.idle = idle
        self.clock = clock
        self._max = max_sessions
        self._sessions: OrderedDict[bytes, Session] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._sessions.values()))

    def create(self, actor: Actor, who: str) -> tuple[str, Session]:
        """A new session (a new id: sign-in never reuses one) and its cookie value."""
        now = self.clock()
        self._sweep(now)
        while len(self._sessions) >= self._max:
            self._sessions.popitem(last=False)
        session_id = secrets.token_urlsafe(32)
        session = Session(actor, who, secrets.token_urlsafe(32), now + self.lifetime, now)
        self._sessions[_digest(session_id)] = session
        return session_id, session

    def get(self, session_id: str | None) -> Session | None:
        if not session_id or len(session_id) > 100:
            return None
        digest = _digest(session_id)
        session = self._sessions.get(digest)
        if session is None:
            return None
        now = self.clock()
        if now >= session.expires_at or now - session.last_seen >= self.idle:
            del self._sessions[digest]
            return None
        session.last_seen = now
        return session

    def delete(self, session_id: str | None) -> None:
        if session_id:
            self._sessions.pop(_digest(session_id), None)

    def end_for_token(self, token_id: str) -> None:
        """End every session a (now revoked) team token opened."""
        for digest in [d for d, s in self._sessions.items() if s.actor.token_id == token_id]:
            del self._sessions[digest]

    def _sweep(self, now: float) -> None:
        expired = [
            digest
            for digest, s in self._sessions.items()
            if now >= s.expires_at or now - s.last_seen >= self.idle
        ]
        for digest in expired:
            del self._sessions[digest]
