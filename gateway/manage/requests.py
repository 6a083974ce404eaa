"""The request log's search: one team's requests, newest first, by filters and pages.

A team token searches its own team only (anything else is "not found"); every
filter is checked here, so the admin API, the console and the CLI accept and
refuse the same values with the same words.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from dataclasses import dataclass, replace

from gateway.manage._core import Core
from gateway.manage.actors import SYSTEM, Actor
from gateway.manage.bounds import EARLIEST, LATEST, LIST_MAX
from gateway.manage.inputs import Check, InputError, text_problem
from gateway.storage import LoggedRequest, RequestQuery

__all__ = ["RequestFilters", "RequestPage", "RequestReads", "decode_cursor", "encode_cursor"]

_STATUS = re.compile(r"([1-5])(?:([0-9]{2})|xx)\Z", re.ASCII)
_CURSOR = re.compile(r"([0-9]{1,12}(?:\.[0-9]{1,17})?) ([0-9]{1,19})\Z", re.ASCII)
_PATH_MAX = 512
CURSOR_PROBLEM = "must be a next_cursor this API returned"


@dataclass(frozen=True, slots=True)
class RequestFilters:
    """A search as the caller wrote it (text from a query string or a command line)."""

    key_id: str | None = None
    status: str | None = None  # "429" or a class such as "4xx"
    outcome: str | None = None
    client_ip: str | None = None  # an address or a CIDR network
    path_prefix: str | None = None
    since: float | None = None
    until: float | None = None


@dataclass(frozen=True, slots=True)
class RequestPage:
    rows: list[LoggedRequest]
    next_cursor: str | None


def encode_cursor(row: LoggedRequest) -> str:
    """The opaque cursor after ``row`` (its time and id)."""
    # repr: the exact float the store holds, so the next page starts just after it.
    raw = f"{row.entry.at!r} {row.id}".encode()
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, int]:
    """(time, id) of a cursor this API returned; InputError naming ``cursor`` otherwise."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InputError.field("cursor", CURSOR_PROBLEM) from None
    match = _CURSOR.match(raw)
    if match is None or not EARLIEST <= float(match[1]) <= LATEST:
        raise InputError.field("cursor", CURSOR_PROBLEM)
    return float(match[1]), int(match[2])


def _status(raw: str | None, check: Check) -> tuple[int | None, tuple[int, int] | None]:
    if raw is None:
        return None, None
    match = _STATUS.match(raw)
    if match is None:
        check.fail("status", "must be a status such as 429 or a class such as 4xx")
        return None, None
    if match[2] is not None:
        return int(raw), None
    first = int(match[1]) * 100
    return None, (first, first + 99)


def _network(raw: str | None, check: Check) -> str | None:
    if raw is None:
        return None
    try:
        if "/" in raw:
            return str(ipaddress.ip_network(raw, strict=False))
        return str(ipaddress.ip_address(raw))
    except ValueError:
        check.fail("client_ip", "must be an IP address or a CIDR network such as 10.0.0.0/8")
        return None


def _query(team_id: str, limit: int, f: RequestFilters, cursor: str | None) -> RequestQuery:
    check = Check()
    check.integer("limit", limit, 1, LIST_MAX)
    status, status_range = _status(f.status, check)
    network = _network(f.client_ip, check)
    if f.outcome is not None:
        check.text("outcome", f.outcome, 40)
    if f.key_id is not None:
        check.text("key_id", f.key_id, 200)
    if f.path_prefix is not None and (
        text_problem(f.path_prefix, _PATH_MAX) is not None or not f.path_prefix.startswith("/")
    ):
        check.fail("path_prefix", f"must be a path starting with / (at most {_PATH_MAX})")
    if f.since is not None and f.until is not None and f.since >= f.until:
        check.fail("from", "must be before 'to'")
    check.done()
    return RequestQuery(
        team_id, limit, f.key_id, status, status_range, f.outcome, network, f.path_prefix,
        f.since, f.until, decode_cursor(cursor) if cursor is not None else None,
    )  # fmt: skip


class RequestReads(Core):
    async def requests(
        self,
        team: str,
        filters: RequestFilters = RequestFilters(),
        limit: int = 100,
        cursor: str | None = None,
        *,
        actor: Actor = SYSTEM,
    ) -> RequestPage:
        """A page of the team's request log, newest first, and the cursor of the next one."""
        query = _query("", limit, filters, cursor)
        owner = await self.team(team, actor=actor)
        rows = await self._backend.find_requests(replace(query, team_id=owner.id))
        after = encode_cursor(rows[-1]) if len(rows) == limit else None
        return RequestPage(rows, after)
