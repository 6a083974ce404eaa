"""The management service: every action on teams, keys, tokens, credits, plans and
webhooks, and the reads.

Each action owns its input bounds, the actor's permission, the change and its
audit entry; the admin API, the console and the CLI only translate their
transport into calls of this class.
"""

from __future__ import annotations

from gateway.manage.credits import CreditActions
from gateway.manage.export import ExportActions
from gateway.manage.keys import KeyActions
from gateway.manage.plans import PlanActions
from gateway.manage.reads import Reads
from gateway.manage.requests import RequestReads
from gateway.manage.teams import TeamActions
from gateway.manage.webhooks import WebhookActions

__all__ = ["Management"]


class Management(
    TeamActions,
    KeyActions,
    CreditActions,
    PlanActions,
    Reads,
    RequestReads,
    ExportActions,
    WebhookActions,
):
    """One object per process, built by the app factory (or the CLI) over its backend."""
