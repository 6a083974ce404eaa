"""The admin API's webhook handlers (contract §5): endpoints, deliveries, tests, alerts."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.admin._handlers import _actor, _body, _limit, _m, _path, _query
from gateway.admin.schemas import ENVIRONMENT, TIMESTAMP, TIMESTAMP_OR_NULL, obj, page
from gateway.errors import json_response
from gateway.events.guard import MAX_URL, RECEIVER_URL_PATTERN
from gateway.manage.bounds import BALANCE_MAX, GRACE_MAX_SECONDS
from gateway.manage.inputs import parse_int
from gateway.manage.webhooks import DESCRIPTION_MAX, attempt_view, endpoint_view
from gateway.storage.events import EVENT_TYPES

__all__ = [
    "ALERTS",
    "ALERT_BODY",
    "ATTEMPT_PAGE",
    "CREATED_WEBHOOK",
    "WEBHOOK",
    "WEBHOOK_BODY",
    "WEBHOOK_CHANGE",
    "WEBHOOK_PAGE",
    "create_webhook",
    "delete_webhook",
    "list_attempts",
    "list_webhooks",
    "retry_delivery",
    "rotate_webhook_secret",
    "set_alerts",
    "test_webhook",
    "update_webhook",
]

_FIELDS = {"url", "events", "description", "enabled"}


async def create_webhook(request: web.Request) -> web.Response:
    fields = await _body(request, _FIELDS - {"enabled"})
    url = fields.string("url", required=True, max_len=2048)
    events = fields.strings("events", required=True)
    description = fields.string("description", max_len=DESCRIPTION_MAX)
    fields.check()
    assert url is not None and events is not None
    made = await _m(request).create_webhook(
        _path(request, "team"), url, events, description or "", actor=_actor(request)
    )
    return json_response(201, {**endpoint_view(made.endpoint), "secret": made.secret})


async def list_webhooks(request: web.Request) -> web.Response:
    found = await _m(request).webhooks(_path(request, "team"), actor=_actor(request))
    return json_response(200, {"items": [endpoint_view(e) for e in found], "next_cursor": None})


async def update_webhook(request: web.Request) -> web.Response:
    fields = await _body(request, _FIELDS)
    changes: dict[str, Any] = {}
    if fields.present("url"):
        changes["url"] = fields.string("url", required=True, max_len=2048)
    if fields.present("events"):
        changes["events"] = fields.strings("events", required=True)
    if fields.present("description"):
        changes["description"] = fields.string("description", max_len=DESCRIPTION_MAX) or ""
    if fields.present("enabled"):
        changes["enabled"] = fields.boolean("enabled", required=True)
    fields.check()
    updated = await _m(request).update_webhook(
        _path(request, "webhook_id"), changes, actor=_actor(request)
    )
    return json_response(200, endpoint_view(updated))


async def delete_webhook(request: web.Request) -> web.Response:
    gone = await _m(request).delete_webhook(_path(request, "webhook_id"), actor=_actor(request))
    return json_response(200, endpoint_view(gone))


async def rotate_webhook_secret(request: web.Request) -> web.Response:
    fields = await _body(request, {"grace_seconds"})
    grace = fields.integer("grace_seconds", minimum=0, maximum=GRACE_MAX_SECONDS)
    fields.check()
    made = await _m(request).rotate_webhook_secret(
        _path(request, "webhook_id"), 86400 if grace is None else grace, actor=_actor(request)
    )
    return json_response(201, {**endpoint_view(made.endpoint), "secret": made.secret})


async def list_attempts(request: web.Request) -> web.Response:
    limit = _limit(request)
    raw = _query(request, "cursor")
    before = None if raw is None else parse_int(raw, "cursor", 1, 2**62)
    found = await _m(request).webhook_attempts(
        _path(request, "webhook_id"), limit, before, actor=_actor(request)
    )
    items = [attempt_view(a) for a in found]
    next_cursor = str(found[-1].id) if len(found) == limit else None
    return json_response(200, {"items": items, "next_cursor": next_cursor})


async def retry_delivery(request: web.Request) -> web.Response:
    delivery_id = await _m(request).retry_delivery(
        _path(request, "webhook_id"), _path(request, "delivery_id"), actor=_actor(request)
    )
    return json_response(202, {"delivery_id": delivery_id, "state": "pending"})


async def test_webhook(request: web.Request) -> web.Response:
    event_id = await _m(request).test_webhook(_path(request, "webhook_id"), actor=_actor(request))
    return json_response(202, {"event_id": event_id, "type": "webhook.test"})


async def set_alerts(request: web.Request) -> web.Response:
    fields = await _body(request, {"environment", "low_balance_threshold"})
    environment = fields.choice("environment", ("live", "test"), "live")
    threshold = fields.integer("low_balance_threshold", minimum=1, maximum=BALANCE_MAX)
    fields.check()
    shown = await _m(request).set_alert(
        _path(request, "team"), threshold, environment=environment, actor=_actor(request)
    )
    return json_response(200, shown)


_EVENT_NAME: dict[str, Any] = {"enum": [*EVENT_TYPES, "*"]}
_URL: dict[str, Any] = {
    "type": "string", "minLength": 1, "maxLength": MAX_URL, "pattern": RECEIVER_URL_PATTERN,
}  # fmt: skip
_EVENTS: dict[str, Any] = {"type": "array", "items": _EVENT_NAME, "minItems": 1, "maxItems": 50}
_DESCRIPTION: dict[str, Any] = {"type": ["string", "null"], "minLength": 1,
                                "maxLength": DESCRIPTION_MAX,
                                "pattern": "^[^\\x00-\\x1f\\x7f-\\x9f]*$"}  # fmt: skip
_WEBHOOK_PROPERTIES: dict[str, Any] = {
    "id": {"type": "string"},
    "team_id": {"type": "string"},
    "url": {"type": "string"},
    "description": {"type": "string"},
    "events": {"type": "array", "items": _EVENT_NAME},
    "enabled": {"type": "boolean"},
    "created_at": TIMESTAMP,
    "failing_since": TIMESTAMP_OR_NULL,
    "disabled_reason": {"type": ["string", "null"]},
}
WEBHOOK = obj(_WEBHOOK_PROPERTIES, list(_WEBHOOK_PROPERTIES))
CREATED_WEBHOOK = obj(
    {**_WEBHOOK_PROPERTIES, "secret": {"type": "string", "pattern": "^whsec_[A-Za-z0-9+/=]+$"}},
    [*_WEBHOOK_PROPERTIES, "secret"],
)
WEBHOOK_PAGE = page(WEBHOOK)
WEBHOOK_BODY = obj({"url": _URL, "events": _EVENTS, "description": _DESCRIPTION},
                   ["url", "events"])  # fmt: skip
WEBHOOK_CHANGE = obj({"url": _URL, "events": _EVENTS, "description": _DESCRIPTION,
                      "enabled": {"type": "boolean"}})  # fmt: skip
_ATTEMPT_PROPERTIES: dict[str, Any] = {
    "id": {"type": "integer"},
    "delivery_id": {"type": "string"},
    "event_id": {"type": "string"},
    "event_type": {"type": "string"},
    "at": TIMESTAMP,
    "state": {"enum": ["pending", "delivered", "failed"]},
    "response_status": {"type": ["integer", "null"]},
    "latency_ms": {"type": "number"},
    "error": {"type": ["string", "null"]},
    "next_attempt_at": TIMESTAMP_OR_NULL,
}
ATTEMPT_PAGE = page(obj(_ATTEMPT_PROPERTIES, list(_ATTEMPT_PROPERTIES)))
ALERT_BODY = obj({"environment": {"enum": ["live", "test", None]},
                  "low_balance_threshold": {"type": ["integer", "null"], "minimum": 1,
                                            "maximum": BALANCE_MAX}})  # fmt: skip
ALERTS = obj({"team_id": {"type": "string"}, "environment": ENVIRONMENT,
              "low_balance_threshold": {"type": ["integer", "null"]}},
             ["team_id", "environment", "low_balance_threshold"])  # fmt: skip
