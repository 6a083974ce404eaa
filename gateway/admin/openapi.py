"""The OpenAPI 3.1 document of the admin API, built from the route table itself."""

from __future__ import annotations

import re
from typing import Any

from gateway.admin.routes import ID_PATTERNS, OPERATIONS, Operation
from gateway.admin.schemas import ERROR

__all__ = ["openapi_document"]

_ERROR_TEXT = {
    400: "The body is not JSON or not an object",
    401: "Missing or wrong token",
    403: "An action a team token may never take",
    404: "Unknown team, key or token (or outside a team token's team)",
    409: "A conflict with the stored state",
    413: "Body over 1 MiB",
    422: "A field missing, unknown, of the wrong type or out of range",
}
_PATH_PARAMETER = re.compile(r"{(\w+)}")


def _operation(op: Operation) -> dict[str, Any]:
    """One operation as the document says it: parameters, responses, body."""
    parameters: list[dict[str, Any]] = [
        {
            "name": name,
            "in": "path",
            "required": True,
            "schema": {"type": "string", "pattern": f"^{ID_PATTERNS[name]}$"},
        }
        for name in _PATH_PARAMETER.findall(op.path)
    ]
    parameters += [
        {"name": name, "in": "query", "required": False, "schema": schema}
        for name, schema in op.query.items()
    ]
    parameters += [
        {"name": name, "in": "header", "required": False, "schema": schema}
        for name, schema in op.headers.items()
    ]
    errors = sorted({400, 401, 404, 413, 422, *op.errors})
    responses: dict[str, Any] = {
        str(op.success): {
            "description": op.summary,
            "content": {media: {"schema": op.response} for media in op.media_types},
        }
    }
    for code in errors:
        responses[str(code)] = {
            "description": _ERROR_TEXT[code],
            "content": {"application/json": {"schema": ERROR}},
        }
    operation: dict[str, Any] = {
        "operationId": op.operation_id,
        "summary": op.summary,
        "parameters": parameters,
        "responses": responses,
    }
    if op.body is not None:
        operation["requestBody"] = {
            "required": bool(op.body.get("required")),
            "content": {"application/json": {"schema": op.body}},
        }
    return operation


def openapi_document(version: str) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        paths.setdefault(op.path, {})[op.method.lower()] = _operation(op)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Gateway admin API",
            "version": version,
            "description": (
                "Teams, API keys, credits, plans, usage and the request log, webhooks, "
                "team tokens and the audit log."
            ),
        },
        "servers": [{"url": "/"}],
        "components": {
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "The admin token, or a team-scoped management token",
                }
            }
        },
        "security": [{"bearer": []}],
        "paths": paths,
    }
