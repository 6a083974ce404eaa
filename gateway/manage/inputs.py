"""Reading and checking management input: one set of parsers for every adapter.

Each accepts exactly what the OpenAPI document promises (ASCII digits, RFC 3339
within the years the backends store, ids of our own shape) and refuses the rest
with an :class:`InputError` naming the field, so nothing a caller sends can reach
a backend it would break (a NUL byte on PostgreSQL, a year past 9999, 10**5000).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson

from gateway.manage.bounds import EARLIEST, LATEST

__all__ = [
    "Check",
    "Fields",
    "InputError",
    "Unknown",
    "clean",
    "id_cursor",
    "parse_int",
    "parse_json_object",
    "parse_time",
    "text_problem",
]

# C0 and C1 control characters (NUL among them): never part of a name or a reason.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
# Undecodable bytes arrive as lone surrogates (surrogateescape) or U+FFFD (yarl): never text.
_SURROGATE = re.compile("[\ud800-\udfff\ufffd]")
_INTEGER = re.compile(r"[+-]?[0-9]{1,20}\Z", re.ASCII)
_RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})(\.[0-9]{1,9})?"
    r"(?:([Zz])|([+-])([0-9]{2}):([0-9]{2}))\Z",
    re.ASCII,
)
_ID = {
    "team": re.compile(r"team_[0-9a-f]{1,64}\Z", re.ASCII),
    "key": re.compile(r"key_[0-9a-f]{1,64}\Z", re.ASCII),
    "tok": re.compile(r"tok_[0-9a-f]{1,64}\Z", re.ASCII),
}
TIME_PROBLEM = "must be an RFC 3339 time with a time zone, from 1970 to 9999-12-31T23:59:59Z"


class InputError(Exception):
    """Bad input: a 4xx naming each field and what is wrong with it."""

    def __init__(self, status: int, message: str, details: list[dict[str, str]] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.details = details or []

    @classmethod
    def field(cls, name: str, problem: str, status: int = 422) -> InputError:
        return cls(status, "Invalid input", [{"field": name, "problem": problem}])


class Unknown(InputError):
    """Not there, or not the caller's: one answer for both, so a team token learns nothing."""

    def __init__(self, what: str, field: str, problem: str = "not found") -> None:
        super().__init__(404, f"No such {what}", [{"field": field, "problem": problem}])


def text_problem(value: str, max_len: int, min_len: int = 1) -> str | None:
    if not min_len <= len(value) <= max_len:
        return f"must be {min_len} to {max_len} characters long"
    if _CONTROL.search(value) or _SURROGATE.search(value):
        return "must not contain control characters or undecodable bytes"
    return None


def clean(value: str, name: str, max_len: int = 200) -> str:
    """A free-form identifier from a path or query (a team name, say): printable, bounded."""
    problem = text_problem(value, max_len)
    if problem is not None:
        raise InputError.field(name, problem)
    return value


def parse_int(raw: str, name: str, minimum: int, maximum: int) -> int:
    """Decimal ASCII digits with an optional sign (``str.isdigit`` would take ``²`` and ``٣``)."""
    if _INTEGER.match(raw):
        value = int(raw)
        if minimum <= value <= maximum:
            return value
    raise InputError.field(name, f"must be an integer from {minimum} to {maximum}")


def time_value(raw: str) -> float | None:
    """Epoch seconds of an RFC 3339 time the backends can store, else None."""
    match = _RFC3339.match(raw)
    if match is None:
        return None
    year, month, day, hour, minute, second, fraction, zulu, sign, oh, om = match.groups()
    try:
        offset = timedelta(hours=int(oh), minutes=int(om)) if not zulu else timedelta(0)
        zone = UTC if zulu else timezone(-offset if sign == "-" else offset)
        local = datetime(
            int(year), int(month), int(day), int(hour), int(minute), int(second), tzinfo=zone
        )
    except ValueError:  # month 13, hour 24, an offset of a day or more
        return None
    # Subtracting aware datetimes never overflows, unlike converting near year 9999.
    seconds = (local - datetime(1970, 1, 1, tzinfo=UTC)).total_seconds()
    seconds += float(fraction) if fraction else 0.0
    return seconds if EARLIEST <= seconds <= LATEST else None


def parse_time(raw: str, name: str) -> float:
    seconds = time_value(raw)
    if seconds is None:
        raise InputError.field(name, TIME_PROBLEM)
    return seconds


def id_cursor(raw: str | None, kind: str, name: str = "cursor") -> str | None:
    """A list cursor: the last id of a page this API returned, verified by its shape."""
    if raw is None:
        return None
    if not _ID[kind].match(raw):
        raise InputError.field(name, "must be a next_cursor this API returned")
    return raw


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """A request body as a JSON object: 400 when it is not JSON or not an object."""
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

    def _given(self, name: str, required: bool, missing: str = "is required") -> Any:
        value = self._data.get(name)
        if value is None and required:
            self.problem(name, missing)
        return value

    def string(self, name: str, *, required: bool = False, max_len: int = 100) -> str | None:
        value = self._given(name, required)
        if value is None:
            return None
        if not isinstance(value, str):
            self.problem(name, "must be a string")
            return None
        problem = text_problem(value, max_len)
        if problem is not None:
            self.problem(name, problem)
            return None
        return value

    def strings(
        self, name: str, *, required: bool = False, max_items: int = 50
    ) -> list[str] | None:
        """A list of short strings (each checked like a name)."""
        value = self._given(name, required)
        if value is None:
            return None
        if not isinstance(value, list) or len(value) > max_items:
            self.problem(name, f"must be a list of at most {max_items} strings")
            return None
        if not all(isinstance(v, str) and text_problem(v, 100) is None for v in value):
            self.problem(name, "must hold only short strings")
            return None
        return value

    def integer(
        self, name: str, *, required: bool = False, minimum: int, maximum: int
    ) -> int | None:
        value = self._given(name, required)
        if value is None:
            return None
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            value = int(value)  # JSON has one number type: 5.0 is the integer 5
        if isinstance(value, bool) or not isinstance(value, int):
            self.problem(name, "must be an integer")
        elif not minimum <= value <= maximum:
            self.problem(name, f"must be an integer from {minimum} to {maximum}")
        else:
            return value
        return None

    def boolean(self, name: str, *, required: bool = False) -> bool | None:
        value = self._given(name, required, "must be true or false")
        if value is None:
            return None
        if not isinstance(value, bool):
            self.problem(name, "must be true or false")
            return None
        return value

    def choice(self, name: str, options: tuple[str, ...], default: str) -> str:
        value = self._data.get(name)
        if value is None:
            return default
        if value not in options:
            self.problem(name, "must be one of " + ", ".join(options))
            return default
        return str(value)

    def time(self, name: str) -> float | None:
        """An RFC 3339 time or null (None either way when absent or wrong)."""
        value = self._data.get(name)
        if value is None:
            return None
        seconds = time_value(value) if isinstance(value, str) else None
        if seconds is None:
            self.problem(name, TIME_PROBLEM + ", or null")
        return seconds

    def check(self) -> None:
        if self._problems:
            raise InputError(422, "Invalid input", self._problems)


class Check:
    """The service's own checks of typed values (the CLI hands them in unchecked)."""

    def __init__(self) -> None:
        self._details: list[dict[str, str]] = []

    def fail(self, name: str, problem: str) -> None:
        self._details.append({"field": name, "problem": problem})

    def unknown(self, name: str) -> None:
        self.fail(name, "unknown field")

    def text(self, name: str, value: str | None, max_len: int, *, optional: bool = False) -> None:
        if value is None:
            if not optional:
                self.fail(name, "is required")
            return
        problem = text_problem(value, max_len)
        if problem is not None:
            self.fail(name, problem)

    def integer(self, name: str, value: int | None, minimum: int, maximum: int) -> None:
        if value is not None and not minimum <= value <= maximum:
            self.fail(name, f"must be an integer from {minimum} to {maximum}")

    def counts(self, given: Mapping[str, object], bounds: Mapping[str, int]) -> None:
        """Each field of ``bounds`` in ``given``: a whole number from 1 to its bound, or None."""
        for name, most in bounds.items():
            value = given.get(name)
            if isinstance(value, bool) or (value is not None and not isinstance(value, int)):
                self.fail(name, "must be an integer")
            elif value is not None:
                self.integer(name, value, 1, most)

    def time(self, name: str, value: float | None) -> None:
        if value is not None and not EARLIEST <= value <= LATEST:
            self.fail(name, TIME_PROBLEM)

    def choice(self, name: str, value: str, options: tuple[str, ...]) -> None:
        if value not in options:
            self.fail(name, "must be one of " + ", ".join(options))

    def done(self) -> None:
        if self._details:
            raise InputError(422, "Invalid input", self._details)
