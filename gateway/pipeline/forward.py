"""Forwarding: the upstream exchange, its deadlines, and the relay of the answer.

This stage decides nothing about money: it tells the request's settlement
what happened (the status arrived, the answer went out whole, the upstream
broke off, the client left) and the settlement applies the rule table.
"""

from __future__ import annotations

import contextlib
import time

from aiohttp import web
from multidict import CIMultiDict

from gateway import errors
from gateway.config import IdentityHeaderSettings, Settings
from gateway.deadlines import Deadline, Deadlines
from gateway.metrics import Metrics
from gateway.models import Outcome
from gateway.pipeline._http import abort
from gateway.pipeline.admission import Admitted
from gateway.pipeline.body import SMALL_BODY, BodyTooLarge, RequestBodies
from gateway.pipeline.exchange import Exchange
from gateway.pipeline.settlement import Settlement
from gateway.proxy import (
    CHARGE_HEADER,
    ClientAddress,
    HeaderPolicy,
    MalformedAnswer,
    Upstream,
    UpstreamPool,
    upstream_target,
    writable,
)
from gateway.routing import Route
from gateway.upstream import InvalidAnswer, UpstreamAnswer, UpstreamError

__all__ = ["Forwarder", "finish", "outcome_for"]


def outcome_for(status: int) -> Outcome:
    if status < 400:
        return Outcome.OK
    if status < 500:
        return Outcome.CLIENT_ERROR
    return Outcome.UPSTREAM_ERROR


class Forwarder:
    def __init__(
        self,
        settings: Settings,
        upstreams: UpstreamPool,
        addresses: ClientAddress,
        deadlines: Deadlines,
        metrics: Metrics,
    ) -> None:
        self._upstreams = upstreams
        self._addresses = addresses
        self._deadlines = deadlines
        self._metrics = metrics
        self._identity: IdentityHeaderSettings = settings.identity_headers
        self._headers = HeaderPolicy(settings.identity_headers)
        self._bodies = RequestBodies(deadlines)

    async def forward(
        self, request: web.BaseRequest, ex: Exchange, admitted: Admitted, settlement: Settlement
    ) -> web.StreamResponse:
        """Send the request upstream and relay the answer; refusals for what went wrong."""
        route = settlement.route
        upstream = self._upstream(route, ex)
        # The query as the client sent it (a fragment never goes upstream).
        query = admitted.query.partition("#")[0]
        target = upstream_target(admitted.encoded_path, query)
        headers = self._upstream_headers(request, ex, upstream)
        # The route's limit on the whole exchange counts from here, before the
        # body is read: a reservation is held from now on, and its lease allows
        # for max_duration_seconds, not for a client trickling its body forever.
        end = time.monotonic() + route.max_duration_seconds
        body = await self._bodies.read(request, route, end, settlement.attempt)
        sent = time.monotonic()
        try:
            async with self._deadlines.until(
                min(sent + upstream.settings.timeout_seconds, end)
            ) as deadline:
                try:
                    answer = await upstream.client.request(request.method, target, headers, body)
                except TimeoutError:  # the connect timeout
                    raise errors.refuse_upstream(504, "Upstream timed out") from None
                except BodyTooLarge:
                    raise errors.refuse_too_large(route.max_body_bytes) from None
                except InvalidAnswer:
                    raise errors.refuse_upstream(502, "Upstream sent an invalid answer") from None
                except UpstreamError:
                    raise errors.refuse_upstream(502, "Upstream unavailable") from None
                try:
                    deadline.answered(end, upstream.settings.read_timeout_seconds)
                    ex.upstream_seconds = time.monotonic() - sent
                    self._metrics.observe_upstream(upstream.name, ex.upstream_seconds)
                    return await self._relay(request, ex, answer, settlement, deadline)
                finally:
                    answer.release()
        except TimeoutError:
            # A limit ran out: before the status line that is a 504; after it
            # (max_duration_seconds) the client connection is cut, never a clean ending.
            relayed = ex.relayed
            if relayed is None:
                settlement.facts.status = None  # nothing reached the client
                raise errors.refuse_upstream(504, "Upstream timed out") from None
            settlement.facts.broke = True  # finish() cuts the client off
            return relayed

    def _upstream(self, route: Route, ex: Exchange) -> Upstream:
        key = ex.key
        if key is not None and key.environment == "test" and route.test_upstream:
            return self._upstreams[route.test_upstream]
        return self._upstreams[route.upstream]

    def _upstream_headers(
        self, request: web.BaseRequest, ex: Exchange, upstream: Upstream
    ) -> CIMultiDict[str]:
        key = ex.key
        identity: dict[str, str] = {}
        if key is not None:
            ids = self._identity
            identity = {ids.team: key.team_id, ids.key: key.id, ids.environment: key.environment}
        peer = request.remote or ""
        headers = self._headers.upstream(
            request.headers,
            identity_values=identity,
            extra=upstream.extra_headers,
            peer=peer,
            trusted=self._addresses.trusts(peer),
            scheme=request.scheme,
            request_id=ex.request_id,
        )
        ex.trace.inject(headers)
        return headers

    async def _relay(
        self,
        request: web.BaseRequest,
        ex: Exchange,
        answer: UpstreamAnswer,
        settlement: Settlement,
        deadline: Deadline,
    ) -> web.StreamResponse:
        status = answer.status
        reason = answer.reason or ""
        # An answer the server could not write, or not a final status of HTTP/1.1
        # (101 included: upgrades are not relayed), is the upstream's failure.
        if not 200 <= status <= 599 or not writable(reason):
            raise errors.refuse_upstream(502, "Upstream sent an invalid answer")
        try:
            headers = self._headers.client(answer.headers)
        except MalformedAnswer:
            raise errors.refuse_upstream(502, "Upstream sent an invalid answer") from None
        settlement.answered(
            status, answer.headers.getall(CHARGE_HEADER, []), answer.headers.get("Content-Type")
        )
        ex.status, ex.outcome = status, outcome_for(status)
        headers["X-Request-Id"] = ex.request_id
        if ex.rate_headers:
            headers.update(ex.rate_headers)
        remaining = settlement.credits_remaining()
        if remaining is not None:
            headers["X-Credits-Remaining"] = str(remaining)
        length = answer.content_length
        if length is not None and length <= SMALL_BODY and request.method != "HEAD":
            # A small answer of known length is read whole and sent in one write;
            # if the upstream breaks off first, nothing went out yet.
            try:
                data = await _read_whole(answer, deadline)
            except UpstreamError:
                settlement.facts.status = None  # no answer reached the client
                raise errors.refuse_upstream(502, "Upstream broke off") from None
            attempt = settlement.attempt
            if attempt is not None:
                attempt.received(data)
            settlement.facts.complete = True
            return web.Response(status=status, reason=reason, headers=headers, body=data)
        response = web.StreamResponse(status=status, reason=reason, headers=headers)
        if length is not None:
            response.content_length = length
        await _stream(request, ex, answer, response, settlement, deadline)
        return response


async def _stream(
    request: web.BaseRequest,
    ex: Exchange,
    answer: UpstreamAnswer,
    response: web.StreamResponse,
    settlement: Settlement,
    deadline: Deadline,
) -> None:
    """Send the status line and copy the body until one side ends or breaks off."""
    facts, attempt = settlement.facts, settlement.attempt
    ex.relayed = response
    try:
        await response.prepare(request)
    except ConnectionError:
        facts.client_left = True
        return
    read = answer.read_chunk
    while True:
        try:
            chunk = await read()
        except UpstreamError:
            # The upstream broke off after its status line: finish() cuts the
            # client off, so it cannot mistake what it got for a whole answer.
            facts.broke = True
            return
        if not chunk:
            facts.complete = True
            return
        if attempt is not None:
            attempt.received(chunk)
        # The quiet limit is the upstream's silence: a client slow to take the
        # chunk does not count against it (max_duration_seconds still does).
        deadline.client_turn()
        try:
            await response.write(chunk)
        except ConnectionError:
            answer.close()
            facts.client_left = True
            return
        deadline.progress()


async def finish(
    request: web.BaseRequest, response: web.StreamResponse, settlement: Settlement
) -> web.StreamResponse:
    """End a streamed answer once its settlement is applied: cleanly only if it went out whole.

    So a client learns how its exchange ended only after the credit and the
    Idempotency-Key are settled: a retry sent at once is judged by that.
    """
    facts = settlement.facts
    if facts.broke:
        abort(request)
    elif facts.complete and response.prepared:
        with contextlib.suppress(ConnectionError):
            await response.write_eof()
    return response


async def _read_whole(answer: UpstreamAnswer, deadline: Deadline) -> bytes:
    """A (small) answer's body, each chunk counting as progress against the quiet limit."""
    chunks: list[bytes] = []
    read = answer.read_chunk
    while chunk := await read():
        chunks.append(chunk)
        deadline.progress()
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)
