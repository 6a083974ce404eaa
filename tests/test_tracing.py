"""OpenTelemetry tracing: spans received and decoded by a real OTLP/HTTP receiver on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from .conftest import Harness, MakeGateway, bearer

ASSESS = "/api/v1/assess"
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
STAGES = {"authenticate", "rate_limit", "reserve", "upstream", "settle"}


@dataclass
class Receiver:
    """An OTLP/HTTP trace receiver: decodes every export request it is sent."""

    server: TestServer | None = None
    spans: list[Span] = field(default_factory=list)
    content_types: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("/v1/traces"))

    async def handle(self, request: web.Request) -> web.Response:
        self.content_types.append(request.content_type)
        export = ExportTraceServiceRequest()
        export.ParseFromString(await request.read())
        for resource in export.resource_spans:
            for scope in resource.scope_spans:
                self.spans.extend(scope.spans)
        body = ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=body, content_type="application/x-protobuf")

    async def wait_for(self, count: int) -> list[Span]:
        async with asyncio.timeout(10):
            while len(self.spans) < count:
                await asyncio.sleep(0.02)
        return self.spans


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    state = Receiver()
    app = web.Application()
    app.router.add_post("/v1/traces", state.handle)
    state.server = TestServer(app, host="127.0.0.1")
    await state.server.start_server()
    yield state
    await state.server.close()


async def _traced(make_gateway: MakeGateway, receiver: Receiver, ratio: float) -> Harness:
    return await make_gateway(
        tracing={
            "enabled": True,
            "endpoint": receiver.url,
            "sample_ratio": ratio,
            "batch_delay_seconds": 0.05,
        }
    )


def _attributes(span: Span) -> dict[str, object]:
    out: dict[str, object] = {}
    for kv in span.attributes:
        value = kv.value
        out[kv.key] = value.int_value if value.HasField("int_value") else value.string_value
    return out


async def test_a_request_is_one_trace_with_a_span_per_stage_continued_from_the_client(
    make_gateway: MakeGateway, receiver: Receiver
) -> None:
    gw = await _traced(make_gateway, receiver, ratio=0.0)  # the client's decision is followed
    key = await gw.key(credits=3)
    headers = {**bearer(key), "traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"}
    resp = await gw.client.post(ASSESS, headers=headers, data=b"{}")
    assert resp.status == 200

    spans = await receiver.wait_for(1 + len(STAGES))
    assert receiver.content_types[0] == "application/x-protobuf"
    assert {s.trace_id.hex() for s in spans} == {CLIENT_TRACE}
    (server,) = [s for s in spans if s.kind == Span.SPAN_KIND_SERVER]
    assert server.parent_span_id.hex() == CLIENT_SPAN
    children = {s.name: s for s in spans if s is not server}
    assert set(children) == STAGES
    assert all(s.parent_span_id == server.span_id for s in children.values())
    attributes = _attributes(server)
    assert attributes["http.request.method"] == "POST"
    assert attributes["http.route"] == ASSESS
    assert attributes["http.response.status_code"] == 200
    assert attributes["gateway.outcome"] == "ok"
    assert attributes["gateway.credits"] == 1
    record = (await gw.gateway.management.keys((await gw.gateway.management.team("acme")).id))[0]
    assert attributes["gateway.key_id"] == record.id
    assert attributes["gateway.team_id"] == record.team_id
    # Never the key itself, in any span.
    assert all(key not in str(_attributes(s)) for s in spans)

    # The upstream joins the trace as a child of the gateway's upstream span.
    (seen,) = gw.upstream.requests
    version, trace_id, parent_id, flags = seen.headers["traceparent"].split("-")
    assert (version, trace_id, flags) == ("00", CLIENT_TRACE, "01")
    assert parent_id == children["upstream"].span_id.hex()


async def test_refused_requests_are_traced_with_their_outcome(
    make_gateway: MakeGateway, receiver: Receiver
) -> None:
    gw = await _traced(make_gateway, receiver, ratio=1.0)
    resp = await gw.client.post(ASSESS, headers=bearer("ckiq_live_nope"), data=b"{}")
    assert resp.status == 401
    spans = await receiver.wait_for(2)
    (server,) = [s for s in spans if s.kind == Span.SPAN_KIND_SERVER]
    assert _attributes(server)["gateway.outcome"] == "unauthorized"
    assert {s.name for s in spans if s is not server} == {"authenticate"}
    assert gw.upstream.requests == []


async def test_unsampled_requests_send_nothing_and_pass_the_clients_traceparent_on(
    make_gateway: MakeGateway, receiver: Receiver
) -> None:
    gw = await _traced(make_gateway, receiver, ratio=0.0)
    key = await gw.key(credits=3)
    assert (await gw.client.post(ASSESS, headers=bearer(key), data=b"{}")).status == 200
    unsampled = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-00"
    headers = {**bearer(key), "traceparent": unsampled}
    assert (await gw.client.post(ASSESS, headers=headers, data=b"{}")).status == 200
    assert gw.gateway.tracing is not None
    await asyncio.to_thread(gw.gateway.tracing.flush)
    assert receiver.spans == []
    first, second = gw.upstream.requests
    assert "traceparent" not in first.headers
    assert second.headers["traceparent"] == unsampled


async def test_tracing_is_off_by_default(gw: Harness) -> None:
    assert gw.gateway.tracing is None
