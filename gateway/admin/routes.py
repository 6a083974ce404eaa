"""Admin API routes (contract §2), declared once in ``OPERATIONS``.

The route table drives both the aiohttp router and the OpenAPI document, so
the two cannot drift; a test also compares the document with the live router.
Each handler only reads its transport (path, query, JSON body, headers) and
calls the management service, which checks bounds and permissions and audits.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from gateway.admin._handlers import (
    create_key,
    create_team,
    create_token,
    get_credits,
    get_usage,
    grant_credits,
    list_keys,
    list_teams,
    list_tokens,
    revoke_by_secret,
    revoke_key,
    revoke_token,
    rotate_key,
    update_key,
    update_team,
)
from gateway.admin._observe import (
    export_usage,
    list_anomalies,
    list_audit,
    list_auth_failures,
    list_requests,
)
from gateway.admin._plans import PLAN, PLAN_BODY, clear_plan, get_plan, set_plan
from gateway.admin._webhooks import (
    ALERT_BODY,
    ALERTS,
    ATTEMPT_PAGE,
    CREATED_WEBHOOK,
    WEBHOOK,
    WEBHOOK_BODY,
    WEBHOOK_CHANGE,
    WEBHOOK_PAGE,
    create_webhook,
    delete_webhook,
    list_attempts,
    list_webhooks,
    retry_delivery,
    rotate_webhook_secret,
    set_alerts,
    test_webhook,
    update_webhook,
)
from gateway.admin.schemas import (
    AMOUNT,
    ANOMALY_PAGE,
    AUDIT_PAGE,
    AUTH_FAILURE_PAGE,
    BALANCES,
    CREATED_KEY,
    CREATED_TOKEN,
    GRACE,
    GRANT_RESULT,
    KEY,
    KEY_PAGE,
    LIMIT,
    NAME,
    RATE_LIMIT,
    REASON,
    REQUEST_PAGE,
    TEAM,
    TEAM_PAGE,
    TIMESTAMP_OR_NULL,
    TOKEN,
    TOKEN_PAGE,
    USAGE,
    cursor,
    obj,
)
from gateway.manage.bounds import KEY_SECRET_MAX
from gateway.manage.keys import LIMIT_BOUNDS

__all__ = ["OPERATIONS", "Operation", "add_routes"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Operation:
    """One admin operation: its route, handler and what the OpenAPI document says."""

    method: str
    path: str
    handler: Handler
    operation_id: str
    summary: str
    success: int
    response: dict[str, Any]
    body: dict[str, Any] | None = None
    query: dict[str, dict[str, Any]] = field(default_factory=dict)
    errors: tuple[int, ...] = ()
    headers: dict[str, dict[str, Any]] = field(default_factory=dict)
    # What a success answers in; anything but JSON is described as a string.
    media_types: tuple[str, ...] = ("application/json",)


# -- the table ------------------------------------------------------------------------------


def _paging(kind: str) -> dict[str, dict[str, Any]]:
    return {"limit": LIMIT, "cursor": cursor(kind)}


# The ledger's cursor is opaque (base64url), checked when decoded.
_LEDGER_PAGING: dict[str, dict[str, Any]] = {
    "limit": LIMIT,
    "cursor": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,200}$"},
}
_OPTIONAL_LIMIT: dict[str, Any] = {**RATE_LIMIT, "type": ["integer", "null"]}
# A key's caps and quotas, and a team's quotas: null clears one.
_KEY_LIMITS: dict[str, Any] = {
    field: {"type": ["integer", "null"], "minimum": 1, "maximum": most}
    for field, most in LIMIT_BOUNDS.items()
}
_TEAM_QUOTAS = {f: _KEY_LIMITS[f] for f in ("quota_per_day", "quota_per_month")}
_NUMERIC_CURSOR: dict[str, Any] = {"type": "string", "pattern": "^[0-9]{1,18}$"}
# null in a create body means "the default", as if the field were absent.
_OPTIONAL_ENVIRONMENT: dict[str, Any] = {"enum": ["live", "test", None]}

OPERATIONS: tuple[Operation, ...] = (
    Operation("POST", "/admin/v1/teams", create_team, "createTeam", "Create a team", 201, TEAM,
              body=obj({"name": NAME, "rate_limit_per_minute": _OPTIONAL_LIMIT}, required=["name"]),
              errors=(403, 409)),
    Operation("GET", "/admin/v1/teams", list_teams, "listTeams", "List teams", 200, TEAM_PAGE,
              query=_paging("team")),
    Operation("PATCH", "/admin/v1/teams/{team}", update_team, "updateTeam",
              "Change a team's settings (its calendar quotas: the admin token only)", 200, TEAM,
              body=obj({"rate_limit_per_minute": _OPTIONAL_LIMIT, **_TEAM_QUOTAS}),
              errors=(403,)),
    Operation("POST", "/admin/v1/teams/{team}/keys", create_key, "createKey",
              "Create an API key (the full key is returned this once)", 201, CREATED_KEY,
              body=obj({"name": NAME, "environment": _OPTIONAL_ENVIRONMENT,
                        "rate_limit_per_minute": _OPTIONAL_LIMIT, "expires_at": TIMESTAMP_OR_NULL,
                        **_KEY_LIMITS},
                       required=["name"])),
    Operation("GET", "/admin/v1/teams/{team}/keys", list_keys, "listKeys",
              "List a team's keys (never the secret)", 200, KEY_PAGE, query=_paging("key")),
    Operation("PATCH", "/admin/v1/keys/{key_id}", update_key, "updateKey", "Change a key", 200,
              KEY, errors=(409,),
              body=obj({"name": NAME, "rate_limit_per_minute": _OPTIONAL_LIMIT,
                        "expires_at": TIMESTAMP_OR_NULL, "disabled": {"type": "boolean"},
                        **_KEY_LIMITS})),
    Operation("POST", "/admin/v1/keys/revoke-by-secret", revoke_by_secret, "revokeKeyBySecret",
              "Revoke a leaked key given its full text", 200, KEY,
              body=obj({"key": {"type": "string", "minLength": 1, "maxLength": KEY_SECRET_MAX,
                                "pattern": "^[\\x21-\\x7e]+$"}},
                       required=["key"]), errors=(409,)),
    Operation("POST", "/admin/v1/keys/{key_id}/revoke", revoke_key, "revokeKey",
              "Revoke a key now", 200, KEY, errors=(409,)),
    Operation("POST", "/admin/v1/keys/{key_id}/rotate", rotate_key, "rotateKey",
              "Replace a key; the old one expires after the grace period", 201, CREATED_KEY,
              body=obj({"grace_seconds": GRACE}),
              errors=(409,)),
    Operation("POST", "/admin/v1/teams/{team}/credits", grant_credits, "grantCredits",
              "Grant (or, negative, adjust) credits", 200, GRANT_RESULT,
              body=obj({"amount": AMOUNT, "environment": _OPTIONAL_ENVIRONMENT, "reason": REASON},
                       required=["amount", "reason"]),
              errors=(403, 409),
              headers={"Idempotency-Key": {"type": "string", "minLength": 1, "maxLength": 255,
                                           "pattern": "^[\\x21-\\x7e]+$"}}),
    Operation("GET", "/admin/v1/teams/{team}/credits", get_credits, "getCredits",
              "Balances per environment and the latest ledger entries", 200, BALANCES,
              query=_LEDGER_PAGING),
    Operation("GET", "/admin/v1/teams/{team}/usage", get_usage, "getUsage",
              "Request counts per bucket by outcome, and credits charged", 200, USAGE,
              query={"from": {"type": "string", "format": "date-time"},
                     "to": {"type": "string", "format": "date-time"},
                     "granularity": {"enum": ["minute", "hour", "day"]},
                     "key_id": {"type": "string"}}),
    Operation("PUT", "/admin/v1/teams/{team}/plan", set_plan, "setPlan",
              "Set the team's plan for one environment; refills the current period once",
              200, PLAN, body=PLAN_BODY, errors=(403,)),
    Operation("GET", "/admin/v1/teams/{team}/plan", get_plan, "getPlan",
              "The team's plan for one environment, with the next refill", 200, PLAN,
              query={"environment": {"enum": ["live", "test"]}}),
    Operation("DELETE", "/admin/v1/teams/{team}/plan", clear_plan, "clearPlan",
              "Remove the team's plan for one environment (the balance stays)", 200, PLAN,
              query={"environment": {"enum": ["live", "test"]}}, errors=(403,)),
    Operation("POST", "/admin/v1/teams/{team}/webhooks", create_webhook, "createWebhook",
              "Add a webhook endpoint (its signing secret is returned this once)", 201,
              CREATED_WEBHOOK, body=WEBHOOK_BODY),
    Operation("GET", "/admin/v1/teams/{team}/webhooks", list_webhooks, "listWebhooks",
              "A team's webhook endpoints (never their secrets)", 200, WEBHOOK_PAGE),
    Operation("PATCH", "/admin/v1/webhooks/{webhook_id}", update_webhook, "updateWebhook",
              "Change an endpoint (enabling it again forgets its failures)", 200, WEBHOOK,
              body=WEBHOOK_CHANGE),
    Operation("DELETE", "/admin/v1/webhooks/{webhook_id}", delete_webhook, "deleteWebhook",
              "Remove an endpoint and its deliveries", 200, WEBHOOK),
    Operation("POST", "/admin/v1/webhooks/{webhook_id}/rotate-secret", rotate_webhook_secret,
              "rotateWebhookSecret", "A new signing secret (returned this once); the old one "
              "signs beside it for grace_seconds (default a day)", 201, CREATED_WEBHOOK,
              body=obj({"grace_seconds": GRACE})),
    Operation("GET", "/admin/v1/webhooks/{webhook_id}/deliveries", list_attempts,
              "listWebhookDeliveries", "Delivery attempts, newest first", 200, ATTEMPT_PAGE,
              query={"limit": LIMIT,
                     "cursor": {"type": "string", "pattern": "^[1-9][0-9]{0,17}$"}}),
    Operation("POST", "/admin/v1/webhooks/{webhook_id}/deliveries/{delivery_id}/retry",
              retry_delivery, "retryWebhookDelivery", "Send a delivery again now", 202,
              obj({"delivery_id": {"type": "string"}, "state": {"const": "pending"}},
                  ["delivery_id", "state"])),
    Operation("POST", "/admin/v1/webhooks/{webhook_id}/test", test_webhook, "testWebhook",
              "Send a webhook.test event to this endpoint", 202,
              obj({"event_id": {"type": "string"}, "type": {"const": "webhook.test"}},
                  ["event_id", "type"])),
    Operation("PUT", "/admin/v1/teams/{team}/alerts", set_alerts, "setAlerts",
              "Where credits.low fires for one environment (null: never)", 200, ALERTS,
              body=ALERT_BODY),
    Operation("POST", "/admin/v1/teams/{team}/tokens", create_token, "createToken",
              "Create a team-scoped management token (shown this once)", 201, CREATED_TOKEN,
              body=obj({"name": NAME}, required=["name"]), errors=(403,)),
    Operation("GET", "/admin/v1/teams/{team}/tokens", list_tokens, "listTokens",
              "List a team's management tokens (never the secret)", 200, TOKEN_PAGE,
              query=_paging("tok")),
    Operation("POST", "/admin/v1/tokens/{token_id}/revoke", revoke_token, "revokeToken",
              "Revoke a team-scoped management token", 200, TOKEN, errors=(409,)),
    Operation("GET", "/admin/v1/audit", list_audit, "listAudit",
              "Who changed what in the admin API, when, from where", 200, AUDIT_PAGE,
              query={"limit": LIMIT, "cursor": _NUMERIC_CURSOR, "team": {"type": "string"}}),
    Operation("GET", "/admin/v1/teams/{team}/requests", list_requests, "listRequests",
              "A team's request log, newest first: who called, from where, with what result "
              "and charge", 200, REQUEST_PAGE,
              query={"key_id": {"type": "string", "maxLength": 200},
                     "status": {"type": "string", "pattern": "^[1-5]([0-9]{2}|xx)$"},
                     "outcome": {"type": "string", "maxLength": 40},
                     "client_ip": {"type": "string", "maxLength": 64},
                     "path_prefix": {"type": "string", "pattern": "^/", "maxLength": 512},
                     "from": {"type": "string", "format": "date-time"},
                     "to": {"type": "string", "format": "date-time"},
                     "limit": LIMIT,
                     "cursor": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"}}),
    Operation("GET", "/admin/v1/teams/{team}/usage/export", export_usage, "exportUsage",
              "A team's usage, streamed: per request (the request log) or per hour or day, "
              "as CSV or CloudEvents 1.0 JSON lines", 200, {"type": "string"},
              query={"from": {"type": "string", "format": "date-time"},
                     "to": {"type": "string", "format": "date-time"},
                     "format": {"enum": ["csv", "cloudevents"]},
                     "per": {"enum": ["request", "hour", "day"]}},
              media_types=("text/csv", "application/cloudevents-batch+jsonl")),
    Operation("GET", "/admin/v1/anomalies", list_anomalies, "listAnomalies",
              "Anomaly signals this replica raised recently", 200, ANOMALY_PAGE,
              query={"limit": LIMIT, "team": {"type": "string"}}),
    Operation("GET", "/admin/v1/auth-failures", list_auth_failures, "listAuthFailures",
              "Refused credentials by key prefix and client address", 200, AUTH_FAILURE_PAGE,
              query={"limit": LIMIT, "from": {"type": "string", "format": "date-time"},
                     "to": {"type": "string", "format": "date-time"}}, errors=(403,)),
)  # fmt: skip


# Ids have a shape, so "/keys/revoke-by-secret" can never be taken for a key id.
ID_PATTERNS = {
    "key_id": "key_[0-9a-f]+",
    "token_id": "tok_[0-9a-f]+",
    "webhook_id": "whep_[0-9a-f]+",
    "delivery_id": "whd_[0-9a-f]+",
    "team": "[^/]+",
}


def route_path(path: str) -> str:
    for name, pattern in ID_PATTERNS.items():
        path = path.replace("{" + name + "}", "{" + name + ":" + pattern + "}")
    return path


def add_routes(app: web.Application) -> None:
    for op in OPERATIONS:
        app.router.add_route(op.method, route_path(op.path), op.handler)
