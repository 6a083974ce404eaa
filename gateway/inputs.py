"""Reading and checking management input, shared by the admin API and the console.

Every problem names its field.
"""

from __future__ import annotations

import re
from typing import Any

import orjson
from aiohttp import web

__all__ = ["Fields", "InputError", "query_int", "read_json"]

# C0 and C1 control characters: never part of a name or a reason.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


class InputError(Exception):
    def __init__(self, status: int, message: str, details: list[dict[str, str]] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.details = details or []


async def read_json(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object: 413 over the cap, 400 not JSON or not an object."""
    raw = await request.read()
    if not raw:
        return {}
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InputError(400, "The body is not valid JSON") from None
    if not isinstance(data, dict):
        raise InputError(400, "The body must be a JSON object")
    return data


class Fields:
    """Typed access to a JSON object that collects every problem before failing."""

    def __init__(self, data: dict[str, Any], allowed: set[str]) -> None:
        self._data = data
        self._problems: list[dict[str, str]] = [
            {"field": name, "problem": "unknown field"} for name in data if name not in allowed
        ]

    def problem(self, name: str, problem: str) -> None:
        self._problems.append({"field": name, "problem": problem})

    def present(self, name: str) -> bool:
        return name in self._data

    def raw(self, name: str) -> Any:
        return self._data.get(name)

    def string(
        self, name: str, *, required: bool = False, min_len: int = 1, max_len: int = 100
    ) -> str | None:
        if name not in self._data or self._data[name] is None:
            if required:
                self.problem(name, "is required")
            return None
        value = self._data[name]
        if not isinstance(value, str):
            self.problem(name, "must be a string")
            return None
        if not min_len <= len(value) <= max_len:
            self.problem(name, f"must be {min_len} to {max_len} characters long")
            return None
        if _CONTROL.search(value):
            self.problem(name, "must not contain control characters")
            return None
        return value

    def integer(
        self,
        name: str,
        *,
        required: bool = False,
        minimum: int | None = None,
        maximum: int | None = None,
    ) -> int | None:
        if name not in self._data or self._data[name] is None:
            if required:
                self.problem(name, "is required")
            return None
        value = self._data[name]
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            value = int(value)  # JSON has one number type: 5.0 is the integer 5
        if isinstance(value, bool) or not isinstance(value, int):
            self.problem(name, "must be an integer")
            return None
        if minimum is not None and value < minimum:
            self.problem(name, f"must be at least {minimum}")
            return None
        if maximum is not None and value > maximum:
            self.problem(name, f"must be at most {maximum}")
            return None
        return value

    def boolean(self, name: str, *, required: bool = False) -> bool | None:
        if name not in self._data or self._data[name] is None:
            if required:
                self.problem(name, "must be true or false")
            return None
        value = self._data[name]
        if not isinstance(value, bool):
            self.problem(name, "must be true or false")
            return None
        return value

    def choice(self, name: str, options: tuple[str, ...], default: str) -> str:
        if name not in self._data or self._data[name] is None:
            return default
        value = self._data[name]
        if value not in options:
            self.problem(name, "must be one of " + ", ".join(options))
            return default
        return str(value)

    def check(self) -> None:
        if self._problems:
            raise InputError(422, "Invalid input", self._problems)


def query_int(request: web.Request, name: str, default: int, minimum: int, maximum: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or not minimum <= int(raw) <= maximum:
        raise InputError(
            422,
            "Invalid query parameter",
            [{"field": name, "problem": f"must be an integer from {minimum} to {maximum}"}],
        )
    return int(raw)
