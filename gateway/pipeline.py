"""The request pipeline: route → authenticate → rate limit → reserve → forward → settle.

Read top to bottom: each stage either passes the request on or answers it.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import math
import os
import re
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.streams import StreamReader
from multidict import CIMultiDict

from gateway import errors, idempotency
from gateway.anomaly import AnomalyDetector
from gateway.config import Settings
from gateway.credits import Credits, PendingReserve
from gateway.deadlines import Deadline, Deadlines, resolution_for
from gateway.keycache import CacheMiss, KeyCache
from gateway.keys import display_prefix, hash_secret, parse_key
from gateway.limiter import Decision, Limit, Limiter, LimiterUnavailable
from gateway.limiter.memory import MemoryLimiter
from gateway.limiter.watch import ReserveAhead
from gateway.metrics import Metrics
from gateway.models import Environment, KeyRecord, Outcome
from gateway.proxy import (
    CHARGE_HEADER,
    ClientAddress,
    HeaderPolicy,
    UpstreamPool,
    upstream_url,
)
from gateway.routing import BadPath, Route, Router, checked_path
from gateway.storage import IdempotencyClaim, IdempotencyRecord, Ledger, StorageError
from gateway.usage import UsageRecorder

__all__ = ["Exchange", "Pipeline"]

log = logging.getLogger("gateway.pipeline")
access_log = logging.getLogger("gateway.access")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# Request ids need to be unique, not secret: a random per-process prefix and a
# counter cost far less than reading the system's random source per request.
_ID_PREFIX = os.urandom(6).hex()
_ID_COUNTER = itertools.count()
_CREDITS_PATHS = frozenset({"/api/v1/credits", "/api/v1/credits/"})
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# Bodies up to this size with a declared length are moved in one piece (one
# write instead of several); larger or chunked ones stream with bounded memory.
SMALL_BODY = 64 * 1024


class _BodyTooLarge(Exception):
    """The upload passed the route's body limit mid-stream."""


class _Relay(enum.Enum):
    COMPLETE = "complete"
    UPSTREAM_BROKE = "upstream_broke"
    CLIENT_LEFT = "client_left"


@dataclass(slots=True)
class Exchange:
    """What one request did, for metrics and the access log."""

    request_id: str
    method: str
    started: float
    route: str = "-"
    status: int = 0
    outcome: Outcome = Outcome.BAD_REQUEST
    key: KeyRecord | None = None
    credits: int = 0
    upstream_seconds: float | None = None
    rate_headers: dict[str, str] = field(default_factory=dict)
    client_ip: str = ""

    def reply(self, response: web.Response, outcome: Outcome) -> web.Response:
        self.status = response.status
        self.outcome = outcome
        response.headers["X-Request-Id"] = self.request_id
        if self.rate_headers:
            response.headers.update(self.rate_headers)
        return response


@dataclass(slots=True)
class _Reservation:
    id: str
    amount: int
    available_after: int
    settled: bool = False


def _rate_headers(decision: Decision) -> dict[str, str]:
    wait = decision.next_after if decision.allowed else decision.retry_after
    t = max(0, math.ceil(wait - 1e-9))
    if not decision.allowed:
        t = max(1, t)
    return {
        "RateLimit-Policy": f'"default";q={decision.limit};w=60',
        "RateLimit": f'"default";r={decision.remaining};t={t}',
        "X-RateLimit-Limit": str(decision.limit),
        "X-RateLimit-Remaining": str(decision.remaining),
        "X-RateLimit-Reset": str(max(0, math.ceil(decision.reset_after - 1e-9))),
    }


def _outcome_for(status: int) -> Outcome:
    if status < 400:
        return Outcome.OK
    if status < 500:
        return Outcome.CLIENT_ERROR
    return Outcome.UPSTREAM_ERROR


def _upstream_charge(route_cost: int, header: str | None) -> int:
    """The charge of a 2xx answer: the route's cost, lowered by ``X-Gateway-Charge``."""
    if header is None:
        return route_cost
    value = header.strip()
    if value.isdigit() and int(value) <= route_cost:
        return int(value)
    log.warning("ignoring an invalid %s header from the upstream", CHARGE_HEADER)
    return route_cost


async def _stream_body(
    content: StreamReader, limit: int, attempt: idempotency.Attempt | None
) -> AsyncIterator[bytes]:
    received = 0
    while True:
        chunk = await content.readany()
        if not chunk:
            return
        received += len(chunk)
        if received > limit:
            raise _BodyTooLarge
        if attempt is not None:
            attempt.sent(chunk)
        yield chunk


def _deadline_resolution(settings: Settings) -> float:
    """How often exchange deadlines are checked: a tenth of the shortest limit, 5-50 ms."""
    limits = [r.max_duration_seconds for r in settings.routes]
    for upstream in settings.upstreams.values():
        limits += (upstream.timeout_seconds, upstream.read_timeout_seconds)
    return resolution_for(min(limits, default=1.0))


async def _read_whole(upstream_response: aiohttp.ClientResponse, deadline: Deadline) -> bytes:
    """A (small) answer's body, each chunk counting as progress against the quiet limit."""
    chunks: list[bytes] = []
    read = upstream_response.content.readany
    while chunk := await read():
        chunks.append(chunk)
        deadline.progress()
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        *,
        router: Router,
        keys: KeyCache,
        limiter: Limiter,
        credits: Credits,
        ledger: Ledger,
        upstreams: UpstreamPool,
        metrics: Metrics,
        usage: UsageRecorder,
        anomalies: AnomalyDetector | None = None,
    ) -> None:
        self._settings = settings
        self._router = router
        self._keys = keys
        self._limiter = limiter
        self._credits = credits
        self._ledger = ledger
        self._upstreams = upstreams
        self._metrics = metrics
        self._usage = usage
        self._background: set[asyncio.Task[None]] = set()
        self._replay_cap = settings.idempotency.replay_cap_bytes
        self._anomalies = anomalies
        self._addresses = ClientAddress(settings.trusted_proxies)
        pepper = settings.keys.pepper
        self._pepper = pepper.get_secret_value().encode() if pepper else None
        limits = settings.rate_limit
        self._default_limit = limits.per_minute
        self._default_burst = limits.burst or limits.per_minute
        self._metered_test = settings.credits.test_environment == "metered"
        self._identity = settings.identity_headers
        self._headers = HeaderPolicy(settings.identity_headers)
        self._limiter_kind = settings.limiter.kind
        self._unknown_keys_per_ip = settings.security.unknown_keys_per_minute_per_ip
        self._lookup_limiter = MemoryLimiter()
        # Overlapping the reserve with the limit decision only pays when the
        # decision is a round trip of its own (Redis).
        self._overlap = settings.limiter.kind == "redis"
        self._ahead = ReserveAhead()
        self._deadlines = Deadlines(resolution=_deadline_resolution(settings))

    # -- the handler ----------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        incoming_id = request.headers.get("X-Request-Id")
        request_id = (
            incoming_id
            if incoming_id is not None and _REQUEST_ID.match(incoming_id)
            else f"{_ID_PREFIX}{next(_ID_COUNTER):020x}"
        )
        exchange = Exchange(request_id, request.method, time.monotonic())
        exchange.client_ip = self._client_ip(request)
        self._metrics.in_flight.inc()
        try:
            return await self._handle(request, exchange)
        except (asyncio.CancelledError, web.HTTPException, ConnectionError):
            raise
        except Exception:
            # A bug. The client still gets JSON with the request id to report; a
            # reservation already taken is voided by the forwarding step's finally,
            # or else by the sweeper when its lease runs out: never charged.
            log.exception("request failed", extra={"fields": {"request_id": request_id}})
            response = errors.error_response(500, "Internal error")
            return exchange.reply(self._unread(request, response), Outcome.UNAVAILABLE)
        finally:
            self._metrics.in_flight.dec()
            self._record(request, exchange)

    async def _handle(self, request: web.Request, ex: Exchange) -> web.StreamResponse:
        try:
            raw_path, _, query = request.raw_path.partition("?")
            path, encoded_path = checked_path(raw_path)
        except BadPath as exc:
            return ex.reply(
                self._unread(request, errors.bad_request(str(exc))), Outcome.BAD_REQUEST
            )

        if path in _CREDITS_PATHS:
            ex.route = "/api/v1/credits"
            if request.method not in ("GET", "HEAD"):
                return ex.reply(
                    self._method_not_allowed(request, {"GET", "HEAD"}), Outcome.NOT_FOUND
                )
            return await self._credits_balance(request, ex)

        match = self._router.match(request.method, path)
        route = match.route
        if route is None:
            if match.allowed:
                return ex.reply(self._method_not_allowed(request, match.allowed), Outcome.NOT_FOUND)
            return ex.reply(
                self._unread(request, errors.error_response(404, "Not found")), Outcome.NOT_FOUND
            )
        ex.route = route.label

        if "Upgrade" in request.headers:
            response = errors.error_response(501, "Protocol upgrades are not supported")
            return ex.reply(self._unread(request, response), Outcome.BAD_REQUEST)
        expect = request.headers.get("Expect")
        if expect is not None and expect.lower() != "100-continue":
            response = errors.error_response(417, f"Unsupported Expect value: {expect[:64]}")
            return ex.reply(self._unread(request, response), Outcome.BAD_REQUEST)

        if not route.auth or request.method == "OPTIONS":
            declared = request.content_length
            if declared is not None and declared > route.max_body_bytes:
                return ex.reply(self._too_large(request, route), Outcome.PAYLOAD_TOO_LARGE)
            return await self._forward(request, ex, route, encoded_path, query, None)

        key = await self._authenticate(request, ex)
        if isinstance(key, web.Response):
            return key
        cost = route.charges(request.method)
        metered = bool(cost) and (key.environment == "live" or self._metered_test)
        declared = request.content_length
        early: PendingReserve | None = None
        if (
            self._overlap
            and metered
            and (declared is None or declared <= route.max_body_bytes)
            and "Idempotency-Key" not in request.headers
            and self._ahead.take(key.id)
        ):
            # Reserve while the limiter decides: one round trip of waiting, not two.
            early = self._credits.start_reserve(key.team_id, key.environment, key.id, cost)
        try:
            refused = await self._rate_limit(request, ex, key)
        except BaseException:
            if early is not None:
                self._credits.abandon(early)
            raise
        if refused is not None:
            if early is not None:
                self._credits.abandon(early)
            return refused

        if declared is not None and declared > route.max_body_bytes:
            return ex.reply(self._too_large(request, route), Outcome.PAYLOAD_TOO_LARGE)

        reservation: _Reservation | None = None
        claim: IdempotencyClaim | None = None
        idempotency_key = request.headers.get("Idempotency-Key")
        if idempotency_key is not None and cost:
            if not idempotency.valid_key(idempotency_key):
                response = errors.bad_request(
                    "Idempotency-Key must be 1-255 visible ASCII characters"
                )
                return ex.reply(self._unread(request, response), Outcome.BAD_REQUEST)
            claim = IdempotencyClaim(idempotency_key, request.method, path)
        if metered:
            try:
                if early is not None:
                    reservation_id, result = await self._credits.finish_reserve(early)
                else:
                    reservation_id, result = await self._credits.reserve(
                        key.team_id, key.environment, key.id, cost, claim
                    )
            except StorageError:
                log.warning("credit reservation failed: database unavailable")
                response = errors.error_response(503, "Service temporarily unavailable")
                return ex.reply(self._unread(request, response), Outcome.UNAVAILABLE)
            if result.replay is not None:
                assert claim is not None
                return await self._replayed(request, ex, route, claim, result.replay)
            if not result.granted:
                response = errors.insufficient_credits(cost, result.available)
                return ex.reply(self._unread(request, response), Outcome.INSUFFICIENT_CREDITS)
            reservation = _Reservation(reservation_id, cost, result.available)
            self._metrics.count_credits("reserved", cost)
        elif claim is not None:
            try:
                record = await self._ledger.claim_idempotency(key.team_id, key.environment, claim)
            except StorageError:
                response = errors.error_response(503, "Service temporarily unavailable")
                return ex.reply(self._unread(request, response), Outcome.UNAVAILABLE)
            if record is not None:
                return await self._replayed(request, ex, route, claim, record)
        attempt = None
        if claim is not None:
            attempt = idempotency.Attempt(claim.key, key.team_id, key.environment, self._replay_cap)
        return await self._forward(request, ex, route, encoded_path, query, reservation, attempt)

    async def _replayed(
        self,
        request: web.Request,
        ex: Exchange,
        route: Route,
        claim: IdempotencyClaim,
        record: IdempotencyRecord,
    ) -> web.Response:
        """A retry under a used Idempotency-Key: 409, 422, or the first answer again."""
        if record.state == "in_flight":
            return ex.reply(self._unread(request, idempotency.in_flight()), Outcome.REPLAYED)
        if record.method != claim.method or record.path != claim.path:
            return ex.reply(self._unread(request, idempotency.mismatch()), Outcome.BAD_REQUEST)
        body = await self._read_body(request, route.max_body_bytes)
        if body is None:
            return ex.reply(self._too_large(request, route), Outcome.PAYLOAD_TOO_LARGE)
        if idempotency.body_hash(body) != record.body_hash:
            return ex.reply(idempotency.mismatch(), Outcome.BAD_REQUEST)
        if not record.body_stored:
            return ex.reply(idempotency.not_stored(), Outcome.REPLAYED)
        return ex.reply(idempotency.replay(record, {}), Outcome.REPLAYED)

    @staticmethod
    async def _read_body(request: web.Request, limit: int) -> bytes | None:
        """The whole request body, or None past ``limit`` (only for replays: bounded)."""
        if not request.body_exists:
            return b""
        if request.headers.get("Expect", "").lower() == "100-continue":
            await request.writer.write(_CONTINUE)
        chunks: list[bytes] = []
        size = 0
        while chunk := await request.content.readany():
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    # -- stages -----------------------------------------------------------------------

    async def _authenticate(self, request: web.Request, ex: Exchange) -> KeyRecord | web.Response:
        header = request.headers.get("Authorization")
        if header is None:
            return ex.reply(self._unread(request, errors.missing_key()), Outcome.UNAUTHORIZED)
        scheme, _, token = header.partition(" ")
        parsed = parse_key(token.strip()) if scheme.lower() == "bearer" else None
        if parsed is None:
            return self._invalid(request, ex, "malformed", token)
        key_hash = hash_secret(parsed.text, self._pepper)
        record = self._keys.cached(key_hash)
        if isinstance(record, CacheMiss):
            # Only lookups the cache cannot answer cost the store anything, so only
            # they count against the client address's budget: brute force is
            # throttled, while keys already in memory keep working from that address.
            # Requests that join a lookup already under way cost nothing more.
            if not self._keys.loading(key_hash):
                throttled = self._lookup_budget(request, ex)
                if throttled is not None:
                    return throttled
            try:
                record = await self._keys.load(key_hash)
            except StorageError:
                response = errors.error_response(503, "Service temporarily unavailable")
                return ex.reply(self._unread(request, response), Outcome.UNAVAILABLE)
        if record is None:
            budget = self._unknown_key_budget(ex)
            if budget is not None:
                self._lookup_limiter.check_now([budget], time.monotonic())
            return self._invalid(request, ex, "unknown", parsed.text)
        if not record.usable_at(time.time()):
            ex.key = record  # logged as the key that was tried; the client learns nothing
            return self._invalid(request, ex, "revoked_or_expired", parsed.text)
        ex.key = record
        return record

    def _unknown_key_budget(self, ex: Exchange) -> Limit | None:
        per_minute = self._unknown_keys_per_ip
        return Limit("ip:" + ex.client_ip, per_minute, per_minute) if per_minute else None

    def _lookup_budget(self, request: web.Request, ex: Exchange) -> web.Response | None:
        """Refuse a store lookup to an address that has sent too many unknown keys.

        Only lookups that find no key are charged (after the fact), so valid keys
        never spend the budget; once it is spent, keys the cache does not know
        are refused from that address until it refills. Decided in this process:
        no remote call, and with N replicas an address gets N budgets, which
        still bounds brute force.
        """
        limit = self._unknown_key_budget(ex)
        if limit is None:
            return None
        decision = self._lookup_limiter.peek_now([limit], time.monotonic())
        if decision.allowed:
            return None
        self._metrics.auth_failures.labels("throttled").inc()
        log.info(
            "key lookups throttled",
            extra={"fields": {"request_id": ex.request_id, "client_ip": ex.client_ip}},
        )
        response = errors.rate_limited(decision.retry_after, limit.per_minute)
        return ex.reply(self._unread(request, response), Outcome.RATE_LIMITED)

    def _invalid(self, request: web.Request, ex: Exchange, reason: str, token: str) -> web.Response:
        self._metrics.auth_failures.labels(reason).inc()
        key = ex.key
        prefix = display_prefix(token) if token.startswith("ckiq_") else None
        self._usage.record_auth_failure(prefix, ex.client_ip, reason)
        if self._anomalies is not None:
            self._anomalies.auth_failure(prefix, ex.client_ip)
        # The attempted key's display prefix at most, never more of it; for a
        # known key (revoked, expired) its id and team, which the client never learns.
        log.info(
            "auth failure",
            extra={
                "fields": {
                    "request_id": ex.request_id,
                    "reason": reason,
                    "key_prefix": prefix,
                    "key_id": key.id if key else None,
                    "team_id": key.team_id if key else None,
                    "client_ip": ex.client_ip,
                }
            },
        )
        return ex.reply(self._unread(request, errors.invalid_key()), Outcome.UNAUTHORIZED)

    def _limits(self, key: KeyRecord) -> list[Limit]:
        if key.rate_limit_per_minute is not None:
            own = Limit("k:" + key.id, key.rate_limit_per_minute, key.rate_limit_per_minute)
        else:
            own = Limit("k:" + key.id, self._default_limit, self._default_burst)
        if key.team_rate_limit_per_minute is None:
            return [own]
        team = key.team_rate_limit_per_minute
        return [own, Limit("t:" + key.team_id, team, team)]

    async def _rate_limit(
        self, request: web.Request, ex: Exchange, key: KeyRecord
    ) -> web.Response | None:
        try:
            decision = await self._limiter.check(self._limits(key), key.team_id)
        except LimiterUnavailable:
            # The shared limiter is down and the policy is to fail closed.
            response = errors.error_response(503, "Service temporarily unavailable")
            return ex.reply(self._unread(request, response), Outcome.UNAVAILABLE)
        ex.rate_headers = _rate_headers(decision)
        if self._overlap:
            self._ahead.saw(key.id, decision)
        decided_by = "fallback" if getattr(self._limiter, "degraded", False) else self._limiter_kind
        if decision.allowed:
            self._metrics.count_decision("allowed", decided_by)
            return None
        self._metrics.count_decision("rejected", decided_by)
        response = errors.rate_limited(decision.retry_after, decision.rejected_limit)
        return ex.reply(self._unread(request, response), Outcome.RATE_LIMITED)

    async def _credits_balance(self, request: web.Request, ex: Exchange) -> web.StreamResponse:
        key = await self._authenticate(request, ex)
        if isinstance(key, web.Response):
            return key
        refused = await self._rate_limit(request, ex, key)
        if refused is not None:
            return refused
        if key.environment == "test" and not self._metered_test:
            available: int | None = None
        else:
            try:
                available = await self._ledger.balance(key.team_id, key.environment)
            except StorageError:
                response = errors.error_response(503, "Service temporarily unavailable")
                return ex.reply(response, Outcome.UNAVAILABLE)
        payload = {"credits_available": available, "environment": key.environment}
        return ex.reply(errors.json_response(200, payload), Outcome.OK)

    # -- forwarding and settlement ---------------------------------------------------

    async def _forward(
        self,
        request: web.Request,
        ex: Exchange,
        route: Route,
        encoded_path: str,
        query: str,
        reservation: _Reservation | None,
        attempt: idempotency.Attempt | None = None,
    ) -> web.StreamResponse:
        key = ex.key
        name = route.upstream
        if key is not None and key.environment == "test" and route.test_upstream:
            name = route.test_upstream
        upstream = self._upstreams[name]
        # The query as the client sent it (a fragment never goes upstream).
        url = upstream_url(upstream.base_url, encoded_path, query.partition("#")[0])
        identity: dict[str, str] = {}
        if key is not None:
            ids = self._identity
            identity = {ids.team: key.team_id, ids.key: key.id, ids.environment: key.environment}
        peer = request.remote or ""
        trusted = self._addresses.trusts(peer)
        headers = self._headers.upstream(
            request.headers,
            identity_values=identity,
            extra=upstream.extra_headers,
            peer=peer,
            trusted=trusted,
            scheme=request.scheme,
            request_id=ex.request_id,
        )
        # The route's limit on the whole exchange counts from here, before the
        # body is read: a reservation is held from now on, and its lease allows
        # for max_duration_seconds, not for a client trickling its body forever.
        started = time.monotonic()
        end = started + route.max_duration_seconds
        body: bytes | AsyncIterator[bytes] | None = None
        if request.body_exists:
            declared = request.content_length
            # Small and of known length (checked against the route's limit already):
            # read whole, so it goes out in one write with the headers.
            small = declared is not None and declared <= SMALL_BODY
            try:
                if small and request.content.is_eof():
                    body = await request.read()  # it came with the headers: no wait
                else:
                    async with self._deadlines.until(end):
                        if request.headers.get("Expect", "").lower() == "100-continue":
                            await request.writer.write(_CONTINUE)
                        if small:
                            body = await request.read()
                        else:
                            body = _stream_body(request.content, route.max_body_bytes, attempt)
                if attempt is not None and isinstance(body, bytes):
                    attempt.sent(body)
            except TimeoutError:
                self._abandon(ex, reservation, attempt)
                late = errors.bad_request(
                    "The request body did not arrive within this route's time limit"
                )
                late = self._unread(request, late)
                # The client has stalled: end its body here, or aiohttp would linger
                # for the rest of it before closing the connection.
                request.content.feed_eof()
                return ex.reply(late, Outcome.BAD_REQUEST)
            except (ConnectionError, asyncio.CancelledError) as exc:
                # The client left before its body arrived: nothing was forwarded.
                self._abandon(ex, reservation, attempt)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                return ex.reply(
                    errors.bad_request("The client closed the connection"), Outcome.BAD_REQUEST
                )

        # What to do with the reservation once the exchange is over:
        # None = void; an int = post that charge.
        charge: int | None = None
        complete = client_left = False
        upstream_response: aiohttp.ClientResponse | None = None
        response: web.StreamResponse | None = None
        # First the upstream's time to answer; once it has, the route's limit on
        # the whole exchange (counted from before the body was read), and the
        # quiet time allowed between upstream body chunks.
        sent = time.monotonic()
        try:
            async with self._deadlines.until(
                min(sent + upstream.settings.timeout_seconds, end)
            ) as deadline:
                try:
                    upstream_response = await upstream.session.request(
                        request.method, url, headers=headers, data=body, allow_redirects=False
                    )
                except TimeoutError:  # aiohttp's own connect and read timeouts
                    return await self._fail(request, ex, reservation, 504, "Upstream timed out")
                except (aiohttp.ClientError, OSError, _BodyTooLarge) as exc:
                    if isinstance(exc, _BodyTooLarge) or isinstance(exc.__cause__, _BodyTooLarge):
                        return await self._fail_too_large(request, ex, route, reservation)
                    return await self._fail(request, ex, reservation, 502, "Upstream unavailable")
                deadline.answered(end, upstream.settings.read_timeout_seconds)
                ex.upstream_seconds = time.monotonic() - sent
                self._metrics.observe_upstream(upstream.name, ex.upstream_seconds)
                status = upstream_response.status
                ex.status, ex.outcome = status, _outcome_for(status)
                if reservation is not None:
                    if 200 <= status < 300:
                        charge = _upstream_charge(
                            reservation.amount, upstream_response.headers.get(CHARGE_HEADER)
                        )
                    elif status not in route.refund_statuses:
                        charge = reservation.amount
                headers_out = self._client_headers(upstream_response, ex, reservation, charge)
                length = upstream_response.content_length
                if length is not None and length <= SMALL_BODY and request.method != "HEAD":
                    # A small answer of known length is read whole and sent in one
                    # write; if the upstream breaks off first, nothing went out yet.
                    try:
                        data = await _read_whole(upstream_response, deadline)
                    except (aiohttp.ClientError, OSError):
                        return await self._fail(request, ex, reservation, 502, "Upstream broke off")
                    if attempt is not None:
                        attempt.received(data)
                    response = web.Response(
                        status=status,
                        reason=upstream_response.reason,
                        headers=headers_out,
                        body=data,
                    )
                    complete = True
                    return response
                response = web.StreamResponse(
                    status=status, reason=upstream_response.reason, headers=headers_out
                )
                if length is not None:
                    response.content_length = length
                relayed = await self._relay(request, upstream_response, response, attempt, deadline)
                complete = relayed is _Relay.COMPLETE
                client_left = relayed is _Relay.CLIENT_LEFT
                if complete:
                    deadline.client_turn()
                    with contextlib.suppress(ConnectionError):
                        await response.write_eof()
                return response
        except TimeoutError:
            # A limit ran out: before the status line that is a 504, after it
            # (max_duration_seconds) the client connection is cut (never a clean ending).
            if response is None:
                return await self._fail(request, ex, reservation, 504, "Upstream timed out")
            self._abort(request)
            return response
        except asyncio.CancelledError:
            client_left = True  # the client went away (handler cancellation)
            raise
        finally:
            if upstream_response is not None:
                upstream_response.release()
            if reservation is not None and not reservation.settled:
                # Also reached when the client left before the status line:
                # charge is None then, so the reservation is voided.
                self._settle(ex, reservation, charge, complete or client_left)
            if attempt is not None:
                self._record_attempt(attempt, upstream_response if response else None, complete)

    def _client_headers(
        self,
        upstream_response: aiohttp.ClientResponse,
        ex: Exchange,
        reservation: _Reservation | None,
        charge: int | None,
    ) -> CIMultiDict[str]:
        headers = self._headers.client(upstream_response.headers)
        headers["X-Request-Id"] = ex.request_id
        if ex.rate_headers:
            headers.update(ex.rate_headers)
        status = upstream_response.status
        if reservation is not None and charge is not None and 200 <= status < 300:
            remaining = reservation.available_after + (reservation.amount - charge)
            headers["X-Credits-Remaining"] = str(remaining)
        return headers

    async def _relay(
        self,
        request: web.Request,
        upstream_response: aiohttp.ClientResponse,
        response: web.StreamResponse,
        attempt: idempotency.Attempt | None,
        deadline: Deadline,
    ) -> _Relay:
        """Send the status line and copy the body until one side ends or breaks off."""
        try:
            await response.prepare(request)
        except ConnectionError:
            return _Relay.CLIENT_LEFT
        read = upstream_response.content.readany
        while True:
            try:
                chunk = await read()
            except (aiohttp.ClientError, OSError, TimeoutError):
                # The upstream broke off after its status line: the client must
                # not mistake what it got for a whole answer.
                self._abort(request)
                return _Relay.UPSTREAM_BROKE
            if not chunk:
                return _Relay.COMPLETE
            if attempt is not None:
                attempt.received(chunk)
            # The quiet limit is the upstream's silence: a client slow to take
            # the chunk does not count against it (max_duration_seconds still does).
            deadline.client_turn()
            try:
                await response.write(chunk)
            except ConnectionError:
                upstream_response.close()
                return _Relay.CLIENT_LEFT
            deadline.progress()

    def _record_attempt(
        self,
        attempt: idempotency.Attempt,
        upstream_response: aiohttp.ClientResponse | None,
        complete: bool,
    ) -> None:
        """Keep a first attempt's answer for replays, or free the key for a fresh try.

        Only attempts the upstream answered are kept (a gateway refusal, a failed
        connection or a broken-off answer is judged afresh on retry). Written in
        the background: the client has its answer already.
        """
        ledger = self._ledger
        env: Environment = "live" if attempt.environment == "live" else "test"
        if upstream_response is None:
            self._spawn(ledger.release_idempotency(attempt.team_id, env, attempt.key))
            return
        self._spawn(
            ledger.complete_idempotency(
                attempt.team_id,
                env,
                attempt.key,
                attempt.body_hash,
                upstream_response.status,
                upstream_response.headers.get("Content-Type"),
                attempt.response_body() if complete else None,
            )
        )

    def _abandon(
        self, ex: Exchange, reservation: _Reservation | None, attempt: idempotency.Attempt | None
    ) -> None:
        """Give back what an exchange that never reached the upstream had taken."""
        if reservation is not None and not reservation.settled:
            self._settle(ex, reservation, None, False)
        if attempt is not None:
            self._record_attempt(attempt, None, False)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("idempotency record not written: %s", task.exception())

    async def close(self) -> None:
        """Wait for background writes (called at shutdown)."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        await self._deadlines.close()

    def _settle(
        self, ex: Exchange, reservation: _Reservation, charge: int | None, stands: bool
    ) -> None:
        """Post or void once the exchange is over; never awaits (runs in ``finally``)."""
        reservation.settled = True
        if charge is not None and stands:
            self._credits.post(reservation.id, charge)
            ex.credits = charge
            self._metrics.count_credits("posted", charge)
            if charge < reservation.amount:
                self._metrics.count_credits("voided", reservation.amount - charge)
            return
        self._credits.void_soon(reservation.id)
        self._metrics.count_credits("voided", reservation.amount)

    async def _fail(
        self,
        request: web.Request,
        ex: Exchange,
        reservation: _Reservation | None,
        status: int,
        message: str,
    ) -> web.Response:
        await self._void(reservation)
        response = errors.error_response(status, message)
        return ex.reply(self._unread(request, response), Outcome.UPSTREAM_ERROR)

    async def _fail_too_large(
        self, request: web.Request, ex: Exchange, route: Route, reservation: _Reservation | None
    ) -> web.Response:
        await self._void(reservation)
        return ex.reply(self._too_large(request, route), Outcome.PAYLOAD_TOO_LARGE)

    async def _void(self, reservation: _Reservation | None) -> None:
        """Give the credit back before answering, so the client sees its balance whole."""
        if reservation is None or reservation.settled:
            return
        reservation.settled = True
        await self._credits.void(reservation.id)
        self._metrics.count_credits("voided", reservation.amount)

    # -- small helpers ------------------------------------------------------------------

    @staticmethod
    def _abort(request: web.Request) -> None:
        transport = request.transport
        if transport is not None:
            transport.abort()

    @staticmethod
    def _unread(request: web.Request, response: web.Response) -> web.Response:
        """Answer without reading the body; the connection then closes."""
        if request.body_exists and not request.content.at_eof():
            response.force_close()
            if request.headers.get("Expect", "").lower() == "100-continue":
                # The client waits for 100 Continue and will never send the body:
                # end it here instead of lingering for bytes that will not come.
                request.content.feed_eof()
        return response

    def _too_large(self, request: web.Request, route: Route) -> web.Response:
        response = errors.error_response(
            413, f"Request body is larger than this route's limit of {route.max_body_bytes} bytes"
        )
        response.force_close()
        return response

    def _method_not_allowed(
        self, request: web.Request, allowed: set[str] | frozenset[str]
    ) -> web.Response:
        response = errors.error_response(405, "Method not allowed")
        response.headers["Allow"] = ", ".join(sorted(allowed))
        return self._unread(request, response)

    def _client_ip(self, request: web.Request) -> str:
        return self._addresses.client_ip(request.remote, request.headers.get("X-Forwarded-For"))

    def _record(self, request: web.Request, ex: Exchange) -> None:
        elapsed = time.monotonic() - ex.started
        key = ex.key
        if key is not None:
            used = ex.outcome is not Outcome.UNAUTHORIZED
            self._usage.record(key, ex.outcome.value, ex.credits, used=used)
            if used:
                self._usage.record_ip(key, ex.client_ip)
                if self._anomalies is not None:
                    self._anomalies.request(key.id, key.team_id, ex.client_ip)
        self._metrics.count_request(
            ex.route, ex.method, ex.status, ex.outcome.value, ex.key.team_id if ex.key else None
        )
        self._metrics.observe_request(ex.route, elapsed)
        if access_log.isEnabledFor(logging.INFO):
            key = ex.key
            access_log.info(
                "request",
                extra={
                    "fields": {
                        "request_id": ex.request_id,
                        "method": ex.method,
                        "route": ex.route,
                        "status": ex.status,
                        "outcome": ex.outcome.value,
                        "team_id": key.team_id if key else None,
                        "key_id": key.id if key else None,
                        "key_prefix": key.prefix if key else None,
                        "credits": ex.credits,
                        "upstream_ms": round(ex.upstream_seconds * 1000, 3)
                        if ex.upstream_seconds is not None
                        else None,
                        "total_ms": round(elapsed * 1000, 3),
                        "client_ip": ex.client_ip,
                    }
                },
            )
