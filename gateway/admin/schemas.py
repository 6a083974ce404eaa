"""JSON schemas of admin API bodies: what the OpenAPI document promises, in one place."""

from __future__ import annotations

from typing import Any

from gateway.manage.bounds import (
    AMOUNT_MAX,
    GRACE_MAX_SECONDS,
    LIST_MAX,
    NAME_MAX,
    RATE_LIMIT_MAX,
    REASON_MAX,
)

__all__ = ["obj"]

# Printable text: no C0/C1 control characters nor U+FFFD (what the input checks refuse).
TEXT_PATTERN = "^[^\\u0000-\\u001f\\u007f-\\u009f\\ufffd]*$"


def obj(
    properties: dict[str, Any], required: list[str] | None = None, *, closed: bool = True
) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required
    if closed:
        schema["additionalProperties"] = False
    return schema


def page(item: dict[str, Any]) -> dict[str, Any]:
    return obj(
        {"items": {"type": "array", "items": item}, "next_cursor": {"type": ["string", "null"]}},
        ["items", "next_cursor"],
    )


NAME: dict[str, Any] = {
    "type": "string",
    "minLength": 1,
    "maxLength": NAME_MAX,
    "pattern": TEXT_PATTERN,
}
REASON: dict[str, Any] = {**NAME, "maxLength": REASON_MAX}
RATE_LIMIT: dict[str, Any] = {"type": "integer", "minimum": 1, "maximum": RATE_LIMIT_MAX}
AMOUNT: dict[str, Any] = {
    "type": "integer",
    "minimum": -AMOUNT_MAX,
    "maximum": AMOUNT_MAX,
    "not": {"const": 0},
}
GRACE: dict[str, Any] = {"type": ["integer", "null"], "minimum": 0, "maximum": GRACE_MAX_SECONDS}
LIMIT: dict[str, Any] = {"type": "integer", "minimum": 1, "maximum": LIST_MAX}


def cursor(kind: str) -> dict[str, Any]:
    """A list's cursor: the last id of the page before (any other value is a 422)."""
    return {"type": "string", "pattern": f"^{kind}_[0-9a-f]{{1,64}}$"}


TIMESTAMP: dict[str, Any] = {"type": "string", "format": "date-time"}
TIMESTAMP_OR_NULL: dict[str, Any] = {"type": ["string", "null"], "format": "date-time"}
ENVIRONMENT: dict[str, Any] = {"enum": ["live", "test"]}

ERROR = obj(
    {"error": {"type": "string"}, "details": {"type": "array", "items": {"type": "object"}}},
    ["error"],
    closed=False,
)
TEAM = obj(
    {
        "id": {"type": "string"},
        "name": {"type": "string"},
        "created_at": TIMESTAMP,
        "rate_limit_per_minute": {"type": ["integer", "null"]},
        "quota_per_day": {"type": ["integer", "null"]},
        "quota_per_month": {"type": ["integer", "null"]},
    },
    ["id", "name", "created_at"],
)
_KEY_PROPERTIES: dict[str, Any] = {
    "id": {"type": "string"},
    "team": {"type": "string"},
    "name": {"type": "string"},
    "prefix": {"type": "string", "minLength": 14, "maxLength": 14},
    "environment": ENVIRONMENT,
    "rate_limit_per_minute": {"type": ["integer", "null"]},
    "disabled": {"type": "boolean"},
    "status": {"enum": ["active", "disabled", "expired", "revoked"]},
    "created_at": TIMESTAMP,
    "last_used_at": TIMESTAMP_OR_NULL,
    "expires_at": TIMESTAMP_OR_NULL,
    "revoked_at": TIMESTAMP_OR_NULL,
    "credit_cap_per_day": {"type": ["integer", "null"]},
    "credit_cap_per_month": {"type": ["integer", "null"]},
    "quota_per_day": {"type": ["integer", "null"]},
    "quota_per_month": {"type": ["integer", "null"]},
}
KEY = obj(_KEY_PROPERTIES, list(_KEY_PROPERTIES))
CREATED_KEY = obj(
    {
        **_KEY_PROPERTIES,
        "key": {"type": "string", "pattern": "^ckiq_(live|test)_[0-9A-Za-z]{38}$"},
        "rotated_from": {"type": "string"},
    },
    [*_KEY_PROPERTIES, "key"],
)
_TOKEN_PROPERTIES: dict[str, Any] = {
    "id": {"type": "string"},
    "team": {"type": "string"},
    "name": {"type": "string"},
    "prefix": {"type": "string"},
    "created_at": TIMESTAMP,
    "last_used_at": TIMESTAMP_OR_NULL,
    "revoked_at": TIMESTAMP_OR_NULL,
}
TOKEN = obj(_TOKEN_PROPERTIES, list(_TOKEN_PROPERTIES))
CREATED_TOKEN = obj(
    {**_TOKEN_PROPERTIES, "token": {"type": "string", "pattern": "^ckiq_mgmt_[0-9A-Za-z]{38}$"}},
    [*_TOKEN_PROPERTIES, "token"],
)
TEAM_PAGE = page(TEAM)
KEY_PAGE = page(KEY)
TOKEN_PAGE = page(TOKEN)
GRANT_RESULT = obj(
    {
        "team": {"type": "string"},
        "environment": ENVIRONMENT,
        "credits_available": {"type": "integer"},
    },
    ["team", "environment", "credits_available"],
)
LEDGER_ENTRY = obj(
    {
        "id": {"type": "string"},
        "environment": ENVIRONMENT,
        "kind": {"type": "string"},
        "amount": {"type": "integer"},
        "reason": {"type": ["string", "null"]},
        "reservation": {"type": ["string", "null"]},
        "created_at": TIMESTAMP,
    },
    ["id", "environment", "kind", "amount", "created_at"],
)
BALANCES = obj(
    {
        "team": {"type": "string"},
        "balances": obj(
            {"live": {"type": "integer"}, "test": {"type": "integer"}}, ["live", "test"]
        ),
        "ledger": {"type": "array", "items": LEDGER_ENTRY},
        "next_cursor": {"type": ["string", "null"]},
    },
    ["team", "balances", "ledger", "next_cursor"],
)
_COUNTS = {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0}}
USAGE = obj(
    {
        "team": {"type": "string"},
        "granularity": {"enum": ["minute", "hour", "day"]},
        "from": TIMESTAMP,
        "to": TIMESTAMP,
        "buckets": {
            "type": "array",
            "items": obj(
                {
                    "start": TIMESTAMP,
                    "requests": _COUNTS,
                    "total": {"type": "integer"},
                    "credits": {"type": "integer"},
                },
                ["start", "requests", "total", "credits"],
            ),
        },
        "totals": obj(
            {"requests": _COUNTS, "total": {"type": "integer"}, "credits": {"type": "integer"}},
            ["requests", "total", "credits"],
        ),
        "top_keys": {
            "type": "array",
            "items": obj(
                {
                    "key": {"type": "string"},
                    "requests": {"type": "integer"},
                    "credits": {"type": "integer"},
                },
                ["key", "requests", "credits"],
            ),
        },
    },
    ["team", "granularity", "from", "to", "buckets", "totals", "top_keys"],
)
AUDIT_ENTRY = obj(
    {
        "id": {"type": "integer"},
        "at": TIMESTAMP,
        "actor": {"type": "string"},
        "action": {"type": "string"},
        "target": {"type": ["string", "null"]},
        "team": {"type": ["string", "null"]},
        "client_ip": {"type": ["string", "null"]},
        "details": {"type": "object"},
    },
    ["id", "at", "actor", "action", "target", "team", "client_ip", "details"],
)
AUDIT_PAGE = page(AUDIT_ENTRY)
ANOMALY_PAGE = page(
    obj(
        {
            "kind": {"enum": ["rate_spike", "new_ips", "auth_failures"]},
            "at": TIMESTAMP,
            "subject": {"type": "string"},
            "team": {"type": ["string", "null"]},
            "observed": {"type": "number"},
            "threshold": {"type": "number"},
            "detail": {"type": "string"},
        },
        ["kind", "at", "subject", "team", "observed", "threshold", "detail"],
    )
)
REQUEST_PAGE = page(
    obj(
        {
            "id": {"type": "integer"},
            "time": TIMESTAMP,
            "request_id": {"type": "string"},
            "key_id": {"type": "string"},
            "key_prefix": {"type": "string"},
            "environment": ENVIRONMENT,
            "method": {"type": "string"},
            "route": {"type": "string"},
            "path": {"type": "string"},
            "status": {"type": "integer"},
            "outcome": {"type": "string"},
            "credits": {"type": "integer"},
            "client_ip": {"type": "string"},
            "user_agent": {"type": "string"},
            "duration_ms": {"type": "number"},
        },
        [
            "id", "time", "request_id", "key_id", "key_prefix", "environment", "method",
            "route", "path", "status", "outcome", "credits", "client_ip", "user_agent",
            "duration_ms",
        ],
    )
)  # fmt: skip
AUTH_FAILURE_PAGE = page(
    obj(
        {
            "key_prefix": {"type": ["string", "null"]},
            "client_ip": {"type": "string"},
            "reason": {"type": "string"},
            "count": {"type": "integer"},
        },
        ["key_prefix", "client_ip", "reason", "count"],
    )
)
