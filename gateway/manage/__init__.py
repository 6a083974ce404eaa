"""The management service behind the admin API, the console and the CLI (see ``service``)."""

from __future__ import annotations

from gateway.manage._core import KeyChangeListener, iso
from gateway.manage.actors import ADMIN, SYSTEM, Actor, operator, team_token
from gateway.manage.credits import Granted
from gateway.manage.inputs import InputError, Unknown
from gateway.manage.keys import CreatedKey
from gateway.manage.service import Management
from gateway.manage.teams import CreatedToken

__all__ = [
    "ADMIN",
    "SYSTEM",
    "Actor",
    "CreatedKey",
    "CreatedToken",
    "Granted",
    "InputError",
    "KeyChangeListener",
    "Management",
    "Unknown",
    "iso",
    "operator",
    "team_token",
]
