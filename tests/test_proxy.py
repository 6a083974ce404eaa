"""Forwarding: routing, header hygiene, identity and forwarding headers."""

import pytest

from .conftest import Harness, MakeGateway, bearer, raw_http


async def test_not_found_and_wrong_method_come_before_authentication(gw: Harness) -> None:
    resp = await gw.client.post("/api/v2/assess")
    assert resp.status == 404 and await resp.json() == {"error": "Not found"}
    resp = await gw.client.delete("/api/v1/assess")
    assert resp.status == 405
    assert resp.headers["Allow"] == "GET, HEAD, POST"
    assert "WWW-Authenticate" not in resp.headers
    assert "X-Request-Id" in resp.headers


async def test_whole_segment_prefix_matching(gw: Harness) -> None:
    key = await gw.key(credits=5)
    assert (await gw.client.post("/api/v1/assess/sub/path", headers=bearer(key))).status == 200
    assert gw.upstream.requests[-1].path_qs == "/api/v1/assess/sub/path"
    assert (await gw.client.post("/api/v1/assessment", headers=bearer(key))).status == 404
    assert (await gw.client.post("/api/v1/assess/", headers=bearer(key))).status == 200


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/assess/../x",
        "/api/v1/%2e%2e/assess",
        "/api/v1/assess%2Fx",
        "/api/v1/assess%5cx",
        "/api//v1/assess",
        "/api/v1/./assess",
    ],
)
async def test_path_tricks_are_400(gw: Harness, path: str) -> None:
    key = await gw.key()
    request = (
        f"POST {path} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {key}\r\n"
        "Content-Length: 0\r\nConnection: close\r\n\r\n"
    ).encode()
    status, body = await raw_http(gw.client, request)
    assert status == 400, path
    assert b'"error"' in body
    assert gw.upstream.requests == []


async def test_encoded_path_is_matched_and_forwarded_decoded(gw: Harness) -> None:
    key = await gw.key(credits=1)
    # "/api/v1/%61ssess" is "/api/v1/assess": it is charged, and forwarded canonically.
    resp = await gw.client.post("/api/v1/%61ssess", headers=bearer(key))
    assert resp.status == 200
    assert gw.upstream.requests[-1].path_qs == "/api/v1/assess"
    await gw.settle()
    assert await gw.balance() == 0


async def test_query_string_is_forwarded(gw: Harness) -> None:
    key = await gw.key()
    await gw.client.post("/api/v1/assess?lang=en&x=%20y", headers=bearer(key))
    assert gw.upstream.requests[-1].path_qs == "/api/v1/assess?lang=en&x=%20y"


async def test_request_headers_are_cleaned(gw: Harness) -> None:
    key = await gw.key()
    resp = await gw.client.post(
        "/api/v1/assess",
        headers={
            **bearer(key),
            "Connection": "keep-alive, X-Secret-Hop",
            "X-Secret-Hop": "drop me",
            "Keep-Alive": "timeout=5",
            "Proxy-Authorization": "Basic abc",
            "TE": "trailers",
            "X-Gateway-Team-Id": "team_spoofed",
            "x-gateway-anything": "spoofed",
            "X-Forwarded-For": "6.6.6.6",
            "X-Custom": "kept",
        },
    )
    assert resp.status == 200
    seen = {k.lower(): v for k, v in gw.upstream.requests[-1].headers.items()}
    for name in (
        "authorization",
        "x-secret-hop",
        "keep-alive",
        "proxy-authorization",
        "te",
        "x-gateway-anything",
    ):
        assert name not in seen, name
    record = (await gw.gateway.management.keys("acme"))[0]
    assert seen["x-gateway-team-id"] == record.team_id
    assert seen["x-gateway-key-id"] == record.id
    assert seen["x-gateway-environment"] == "live"
    assert seen["x-forwarded-for"] == "127.0.0.1"  # the client is not a trusted proxy
    assert seen["x-forwarded-proto"] == "http"
    assert seen["x-custom"] == "kept"
    assert key not in str(seen)


async def test_no_header_the_client_did_not_send_is_added(gw: Harness) -> None:
    # A raw request with no User-Agent, Accept, Accept-Encoding or Content-Type:
    # the HTTP client library must not invent them (an Accept-Encoding would
    # make the upstream compress an answer this client never asked to decode).
    key = await gw.key()
    request = (
        "POST /api/v1/assess HTTP/1.1\r\nHost: gw\r\n"
        f"Authorization: Bearer {key}\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
    ).encode()
    status, _ = await raw_http(gw.client, request)
    assert status == 200
    seen = {k.lower() for k in gw.upstream.requests[-1].headers}
    for name in ("user-agent", "accept", "accept-encoding", "content-type"):
        assert name not in seen, name
    assert gw.upstream.requests[-1].body == b"{}"


async def test_headers_are_judged_the_same_way_every_time(gw: Harness) -> None:
    # Verdicts per header name are remembered; a name's case or a Connection
    # listing in a later request must still be honoured.
    key = await gw.key()
    for hop in ("X-Hop", "x-hop"):
        resp = await gw.client.post(
            "/api/v1/assess",
            headers={**bearer(key), "X-Kept": "1", "Connection": f"keep-alive, {hop}", hop: "v"},
        )
        assert resp.status == 200
        seen = {k.lower() for k in gw.upstream.requests[-1].headers}
        assert "x-kept" in seen and "x-hop" not in seen
    resp = await gw.client.post("/api/v1/assess", headers={**bearer(key), "X-Hop": "v"})
    assert "x-hop" in {k.lower() for k in gw.upstream.requests[-1].headers}


async def test_trusted_proxy_forwarded_for_is_kept(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(trusted_proxies=["127.0.0.0/8"])
    key = await gw.key()
    await gw.client.post(
        "/api/v1/assess", headers={**bearer(key), "X-Forwarded-For": "203.0.113.9"}
    )
    seen = gw.upstream.requests[-1].headers
    assert seen["X-Forwarded-For"] == "203.0.113.9, 127.0.0.1"


async def test_response_headers_are_cleaned(gw: Harness) -> None:
    key = await gw.key()
    gw.upstream.headers = {
        "X-Gateway-Charge": "1",
        "Keep-Alive": "timeout=99",
        "X-Upstream": "kept",
        "Set-Cookie": "a=1",
    }
    resp = await gw.client.post("/api/v1/assess", headers=bearer(key))
    assert resp.status == 200
    assert "X-Gateway-Charge" not in resp.headers
    assert resp.headers.get("Keep-Alive") is None
    assert resp.headers["X-Upstream"] == "kept"
    assert resp.headers["Set-Cookie"] == "a=1"


async def test_request_id_kept_if_sane_else_generated(gw: Harness) -> None:
    key = await gw.key()
    resp = await gw.client.post(
        "/api/v1/assess", headers={**bearer(key), "X-Request-Id": "abc-123"}
    )
    assert resp.headers["X-Request-Id"] == "abc-123"
    assert gw.upstream.requests[-1].headers["X-Request-Id"] == "abc-123"
    resp = await gw.client.post(
        "/api/v1/assess", headers={**bearer(key), "X-Request-Id": "bad id\t"}
    )
    generated = resp.headers["X-Request-Id"]
    assert generated != "bad id\t" and len(generated) == 32
    resp = await gw.client.post("/nowhere")
    assert len(resp.headers["X-Request-Id"]) == 32


async def test_public_route_needs_no_key_and_costs_nothing(gw: Harness) -> None:
    resp = await gw.client.get("/public/status")
    assert resp.status == 200
    seen = gw.upstream.requests[-1].headers
    assert "X-Gateway-Team-Id" not in seen
    assert "RateLimit" not in resp.headers


async def test_upgrade_is_501(gw: Harness) -> None:
    key = await gw.key()
    resp = await gw.client.get(
        "/api/v1/assess", headers={**bearer(key), "Connection": "Upgrade", "Upgrade": "websocket"}
    )
    assert resp.status == 501
    assert gw.upstream.requests == []


async def test_head_is_never_charged(gw: Harness) -> None:
    key = await gw.key(credits=1)
    resp = await gw.client.head("/api/v1/assess", headers=bearer(key))
    assert resp.status == 200
    await gw.settle()
    assert await gw.balance() == 1


async def test_upstream_credentials_from_config(make_gateway: MakeGateway, upstream) -> None:  # type: ignore[no-untyped-def]
    gw = await make_gateway(
        upstreams={
            "assess": {"url": upstream.url, "headers": {"Authorization": "Bearer upstream-secret"}}
        }
    )
    key = await gw.key()
    await gw.client.post("/api/v1/assess", headers=bearer(key))
    assert gw.upstream.requests[-1].headers["Authorization"] == "Bearer upstream-secret"


async def test_body_is_forwarded_intact(gw: Harness) -> None:
    key = await gw.key()
    payload = bytes(range(256)) * 4096
    resp = await gw.client.post("/api/v1/assess", headers=bearer(key), data=payload)
    assert resp.status == 200
    assert gw.upstream.requests[-1].body == payload


async def test_status_listener(gw: Harness, aiohttp_client) -> None:  # type: ignore[no-untyped-def]
    from gateway.status import create_status_app

    status = await aiohttp_client(create_status_app(gw.gateway))
    assert (await status.get("/healthz")).status == 200
    ready = await status.get("/readyz")
    assert ready.status == 200
    body = await ready.json()
    assert body["ready"] is True and body["degraded"] is False
    assert body["backends"]["storage"]["ok"] is True
    key = await gw.key()
    await gw.client.post("/api/v1/assess", headers=bearer(key))
    text = await (await status.get("/metrics")).text()
    labels = 'method="POST",outcome="ok",route="/api/v1/assess",status_class="2xx"'
    assert f"gateway_requests_total{{{labels}}} 1.0" in text
