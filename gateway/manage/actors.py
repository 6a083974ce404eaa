"""Who acts: the operator (admin token), a team's management token, the CLI's user.

Every management action takes an :class:`Actor`; the service checks its
permission and names it in the audit log. Adapters build one and pass it in.
"""

from __future__ import annotations

import dataclasses
import getpass
import socket
from dataclasses import dataclass

from gateway.manage.inputs import InputError

__all__ = ["ADMIN", "SYSTEM", "Actor", "operator", "team_token"]


@dataclass(frozen=True, slots=True)
class Actor:
    label: str  # how the audit log names this caller
    team_id: str | None = None  # None: every team
    token_id: str | None = None
    client_ip: str | None = None
    via: str | None = None  # the adapter, when the audit entry should say ("console")

    @property
    def is_admin(self) -> bool:
        return self.team_id is None

    def may_see(self, team_id: str) -> bool:
        return self.team_id is None or self.team_id == team_id

    def require_admin(self, what: str) -> None:
        if not self.is_admin:
            raise InputError(403, f"A team token may not {what}")

    def at(self, client_ip: str | None, via: str | None = None) -> Actor:
        """The same actor, calling from an address (and through an adapter)."""
        return dataclasses.replace(self, client_ip=client_ip, via=via)


ADMIN = Actor("admin")
# In-process callers with no one behind them: the demo, tests, start-up seeding.
SYSTEM = Actor("system")


def team_token(token_id: str, team_id: str) -> Actor:
    return Actor(f"token:{token_id}", team_id=team_id, token_id=token_id)


def operator() -> Actor:
    """The CLI's user, as far as this machine knows (the CLI has no token to name)."""
    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # no login name and no passwd entry (containers)
        user = "unknown"
    return Actor(f"cli:{user}@{socket.gethostname()}")
