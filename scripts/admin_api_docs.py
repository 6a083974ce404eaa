"""Write docs/admin-api.md, the admin API reference, from the admin API's OpenAPI document.

    python scripts/admin_api_docs.py           # rewrite docs/admin-api.md
    python scripts/admin_api_docs.py --check   # exit 1 when docs/admin-api.md is stale

The document is the one the admin API serves at GET /admin/v1/openapi.json, built
by ``gateway.admin.openapi.openapi_document`` from the route table, without a
server. The output is deterministic: the package version is left out, and the
order is the route table's (areas in a fixed order, error codes sorted).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Iterator, Sequence
from http import HTTPStatus
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a file from a checkout without an install
    sys.path.insert(0, str(ROOT))

from gateway.admin.openapi import openapi_document  # noqa: E402

DOC = ROOT / "docs" / "admin-api.md"
COMMAND = "python scripts/admin_api_docs.py"
METHODS = ("get", "post", "put", "patch", "delete")

# Areas in reading order; an area not listed here follows, alphabetically.
AREAS = {
    "teams": "Teams",
    "keys": "API keys",
    "tokens": "Team tokens",
    "credits": "Credits",
    "usage": "Usage",
    "audit": "Audit log",
    "anomalies": "Anomalies",
    "auth-failures": "Authentication failures",
}
# Patterns with a plainer description than the regular expression itself.
PATTERNS = {
    "^[^\\u0000-\\u001f\\u007f-\\u009f]*$": "no control characters",
    "^[\\x21-\\x7e]+$": "visible ASCII characters only",
}
_PARAMETER = re.compile(r"^{\w+}$")


# -- schema to text ---------------------------------------------------------------------------


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    return "string" if isinstance(value, str) else "object"


def _literal(value: Any) -> str:
    return f"`{value}`" if isinstance(value, str) else f"`{json.dumps(value)}`"


def _number(value: int | float) -> str:
    return f"{value:,}"


def type_text(schema: dict[str, Any]) -> str:
    """The JSON type of a schema in words: ``integer or null``, ``array of object``."""
    if "enum" in schema:
        names = list(dict.fromkeys(_json_type(v) for v in schema["enum"]))
    elif "const" in schema:
        names = [_json_type(schema["const"])]
    else:
        raw = schema.get("type", [])
        names = [raw] if isinstance(raw, str) else list(raw)
    words = []
    for name in names:
        if name == "array" and isinstance(schema.get("items"), dict):
            words.append(f"array of {type_text(schema['items'])}")
        elif name == "object" and isinstance(schema.get("additionalProperties"), dict):
            words.append(f"object of {type_text(schema['additionalProperties'])}")
        else:
            words.append(name)
    return " or ".join(words) or "any"


def _range(low: Any, high: Any, unit: str = "") -> str | None:
    if low is not None and high is not None:
        if low == high:
            return f"exactly {_number(low)}{unit}"
        return f"{_number(low)} to {_number(high)}{unit}"
    if low is not None:
        return f"at least {_number(low)}{unit}"
    if high is not None:
        return f"at most {_number(high)}{unit}"
    return None


def constraints(schema: dict[str, Any]) -> list[str]:
    """What a value must be beyond its type, in words."""
    out: list[str] = []
    if "enum" in schema:
        out.append("one of " + ", ".join(_literal(v) for v in schema["enum"]))
    if "const" in schema:
        out.append(f"always {_literal(schema['const'])}")
    if schema.get("format") == "date-time":
        out.append("RFC 3339 timestamp with a time zone")
    elif "format" in schema:
        out.append(f"format `{schema['format']}`")
    bounds = _range(schema.get("minimum"), schema.get("maximum"))
    if bounds:
        out.append(bounds)
    length = _range(schema.get("minLength"), schema.get("maxLength"), " characters")
    if length:
        out.append(length)
    if "pattern" in schema:
        pattern = schema["pattern"]
        out.append(PATTERNS.get(pattern, f"matches `{pattern}`"))
    forbidden = schema.get("not")
    if isinstance(forbidden, dict) and "const" in forbidden:
        out.append(f"not {_literal(forbidden['const'])}")
    values = schema.get("additionalProperties")
    if isinstance(values, dict):
        out += [f"each value {c}" for c in constraints(values)]
    items = schema.get("items")
    if isinstance(items, dict) and "properties" not in items:
        out += [f"each item {c}" for c in constraints(items)]
    return out


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ") or "—"


def _table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def fields(schema: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, dict[str, Any], bool]]:
    """(dotted name, schema, required) of an object's properties, nested ones flattened.

    ``items[].id`` is the ``id`` of each element of the array ``items``.
    """
    required = set(schema.get("required", ()))
    for name, prop in schema.get("properties", {}).items():
        path = prefix + name
        yield path, prop, name in required
        items = prop.get("items")
        if "properties" in prop:
            yield from fields(prop, path + ".")
        elif isinstance(items, dict) and "properties" in items:
            yield from fields(items, path + "[].")


# -- the document -----------------------------------------------------------------------------


def area_of(path: str, operation: dict[str, Any], base: str) -> str:
    """The operation's tag, else what its path is about: the part after ``{team}``, if any."""
    if operation.get("tags"):
        return str(operation["tags"][0])
    parts = [p for p in path.removeprefix(base).split("/") if p]
    if "{team}" in parts:
        after = parts[parts.index("{team}") + 1 :]
        return after[0] if after else parts[0]
    return parts[0]


def _slug(text: str, seen: dict[str, int]) -> str:
    """The anchor GitHub gives a heading (a repeated one gets ``-1``, ``-2``...)."""
    slug = re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")
    count = seen.get(slug, 0)
    seen[slug] = count + 1
    return f"{slug}-{count}" if count else slug


def _operations(document: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method.upper(), path, operation)
        for path, item in document["paths"].items()
        for method, operation in item.items()
        if method in METHODS
    ]


def _intro(document: dict[str, Any], base: str) -> list[str]:
    operations = _operations(document)
    codes: dict[int, str] = {}
    success: set[int] = set()
    for _, _, operation in operations:
        for code, response in operation["responses"].items():
            if int(code) < 400:
                success.add(int(code))
            else:
                codes.setdefault(int(code), response["description"])
    meanings = {
        200: "Done; the body is the object described",
        201: "Created; the body is the new object",
    }
    status_rows = [
        (f"`{c}` {HTTPStatus(c).phrase}", meanings.get(c, HTTPStatus(c).description))
        for c in sorted(success)
    ]
    status_rows += [(f"`{c}` {HTTPStatus(c).phrase}", codes[c]) for c in sorted(codes)]
    team_only = sorted(f"`{m} {p}`" for m, p, o in operations if "403" in o["responses"])
    info = document["info"]
    return [
        f"# {info['title']} reference",
        "",
        "<!-- Generated by scripts/admin_api_docs.py from the OpenAPI document; do not edit.",
        f"     Regenerate with: {COMMAND} -->",
        "",
        str(info["description"]),
        "",
        f"Every operation below is under `{base}` on the admin listener",
        "(`admin.listen`, `127.0.0.1:9090` by default). The same reference as an",
        f"OpenAPI {document['openapi']} document is served, without a token, at",
        f"`GET {base}/openapi.json`.",
        "",
        "## Conventions",
        "",
        "### Authentication",
        "",
        "Every request carries `Authorization: Bearer <token>`, where the token is either",
        "",
        "- the **admin token** (`admin.token` in the configuration): every operation, on",
        "  every team; or",
        "- a **team token** (`ckiq_mgmt_…`, created with `POST " + base + "/teams/{team}/tokens`):",
        "  only its own team. Anything outside that team answers `404`, as if it did not",
        "  exist; a team listing shows only the token's team. These operations are the",
        "  admin token's alone and answer `403` to a team token:",
        "",
        *[f"  - {operation}" for operation in team_only],
        "",
        "A missing, unknown or revoked token gets `401` with",
        '`WWW-Authenticate: Bearer realm="admin"`. Changes are recorded in the audit log',
        "under `admin` or `token:<id>`.",
        "",
        "### Requests and errors",
        "",
        "Bodies are JSON objects (`Content-Type: application/json`, at most 1 MiB). An",
        "empty body counts as `{}`. A field not listed for an operation is refused.",
        "Every error has the same shape:",
        "",
        "```json",
        '{"error": "Invalid input",',
        ' "details": [{"field": "rate_limit_per_minute", "problem": "must be at least 1"}]}',
        "```",
        "",
        "`error` is always there; `details` names each field that was wrong (a missing,",
        "unknown or out-of-range field, a bad query parameter or header), all of them at",
        "once.",
        "",
        "### Status codes",
        "",
        *_table(("Status", "Meaning"), status_rows),
        "",
        "### Pagination",
        "",
        "Lists take `limit` (how many items, 1 to 1,000; the server picks a default when it",
        'is left out) and `cursor`, and answer `{"items": [...], "next_cursor": ...}`',
        "(the credit ledger's entries are under `ledger` instead of `items`). `next_cursor`",
        "is `null` on the last page; otherwise pass it as `cursor` to get the next one. A",
        "cursor is opaque: use only one this API returned.",
        "",
        "### Idempotent credit grants",
        "",
        f"`POST {base}/teams/{{team}}/credits` takes an optional `Idempotency-Key` header",
        "(1 to 255 visible ASCII characters). Sending the same grant again with the same",
        "key, for the same team, records it once and answers with the current balance;",
        "the same key with a different amount or environment is a `409`. Send one with",
        "every grant that might be retried.",
        "",
        "### Reading this reference",
        "",
        "Types are JSON types; `integer or null` accepts `null`. Nested fields are",
        "written with dots, and `items[].id` is the `id` of each element of `items`.",
        "A response field marked *optional* may be absent from a body; *always* ones are there,",
        "possibly as `null` when their type allows it.",
        "",
    ]


def _parameters(operation: dict[str, Any]) -> list[str]:
    parameters = operation.get("parameters", [])
    if not parameters:
        return []
    rows = [
        (
            f"`{p['name']}`",
            p["in"],
            type_text(p["schema"]),
            "yes" if p.get("required") else "no",
            "; ".join(constraints(p["schema"])),
        )
        for p in parameters
    ]
    return [
        "**Parameters**",
        "",
        *_table(("Name", "In", "Type", "Required", "Constraints"), rows),
        "",
    ]


def _body(method: str, operation: dict[str, Any]) -> list[str]:
    body = operation.get("requestBody")
    if body is None:
        return ["**Request body**: none.", ""] if method != "GET" else []
    schema = body["content"]["application/json"]["schema"]
    rows = [
        (f"`{name}`", type_text(s), "yes" if req else "no", "; ".join(constraints(s)))
        for name, s, req in fields(schema)
    ]
    whether = "required" if body.get("required") else "optional: `{}` when empty"
    return [
        f"**Request body** (JSON object, {whether})",
        "",
        *_table(("Field", "Type", "Required", "Constraints"), rows),
        "",
    ]


def _responses(operation: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    errors = []
    for code, response in operation["responses"].items():
        status = int(code)
        if status >= 400:
            errors.append(status)
            continue
        content = response["content"]
        if "application/json" not in content:
            kinds = ", ".join(f"`{media}`" for media in content)
            lines += [f"**Response** `{status} {HTTPStatus(status).phrase}`: a stream of {kinds}.", ""]
            continue
        schema = content["application/json"]["schema"]
        rows = [
            (
                f"`{name}`",
                type_text(s),
                "always" if req else "optional",
                "; ".join(constraints(s)),
            )
            for name, s, req in fields(schema)
        ]
        lines += [
            f"**Response** `{status} {HTTPStatus(status).phrase}`",
            "",
            *_table(("Field", "Type", "Present", "Values"), rows),
            "",
        ]
    listed = ", ".join(f"`{c}`" for c in sorted(errors))
    lines += [f"**Errors**: {listed} (see [Status codes](#status-codes)).", ""]
    return lines


def render(document: dict[str, Any]) -> str:
    """The Markdown reference of an admin OpenAPI document."""
    operations = _operations(document)
    base = os.path.commonpath([path for _, path, _ in operations])
    base = "/".join(p for p in base.split("/") if not _PARAMETER.match(p)) or "/"
    grouped: dict[str, list[tuple[str, str, dict[str, Any]]]] = {}
    for method, path, operation in operations:
        grouped.setdefault(area_of(path, operation, base), []).append((method, path, operation))
    order = [a for a in AREAS if a in grouped] + sorted(a for a in grouped if a not in AREAS)

    seen: dict[str, int] = {}
    lines = _intro(document, base)
    for heading in [*re.findall(r"^#+ (.*)$", "\n".join(lines), re.MULTILINE), "Operations"]:
        _slug(heading, seen)
    index: list[str] = ["## Operations", ""]
    sections: list[str] = []
    for area in order:
        title = AREAS.get(area, area.replace("-", " ").capitalize())
        index += [f"**[{title}](#{_slug(title, seen)})**", ""]
        rows = []
        sections += [f"## {title}", ""]
        for method, path, operation in grouped[area]:
            heading = f"{method} {path}"
            rows.append((f"[`{heading}`](#{_slug(heading, seen)})", operation["summary"]))
            sections += [
                f"### `{heading}`",
                "",
                f"{operation['summary']}. Operation id `{operation['operationId']}`.",
                "",
                *_parameters(operation),
                *_body(method, operation),
                *_responses(operation),
            ]
        index += [*_table(("Operation", "Summary"), rows), ""]
    text = "\n".join([*lines, *index, *sections])
    return text.rstrip("\n") + "\n"


def generate() -> str:
    """docs/admin-api.md as the current route table describes it."""
    return render(openapi_document("0"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
    args = parser.parse_args(argv)
    text = generate()
    if args.check:
        current = DOC.read_text(encoding="utf-8") if DOC.exists() else None
        if current != text:
            print(f"{DOC.relative_to(ROOT)} is stale: run {COMMAND}", file=sys.stderr)
            return 1
        return 0
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(text, encoding="utf-8")
    print(f"wrote {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
