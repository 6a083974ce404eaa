"""Metrics move as they should, pass promtool, and logs never hold key material."""

from __future__ import annotations

import io
import logging
import shutil
import subprocess
from collections.abc import Iterator

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.logs import LogFormatter, redact
from gateway.status import create_status_app

from .conftest import Harness, MakeGateway, bearer, raw_http


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    out: dict[tuple[tuple[str, str], ...], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                out[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def requests_by_outcome(text: str) -> dict[str, float]:
    totals: dict[str, float] = {}
    for labels, value in samples(text, "gateway_requests_total").items():
        outcome = dict(labels)["outcome"]
        totals[outcome] = totals.get(outcome, 0) + value
    return totals


@pytest.fixture
def captured_logs() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(LogFormatter("json"))
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield stream
    root.removeHandler(handler)
    root.setLevel(old_level)


async def scrape(gw: Harness, aiohttp_client) -> str:  # type: ignore[no-untyped-def]
    status = await aiohttp_client(create_status_app(gw.gateway))
    resp = await status.get("/metrics")
    assert resp.status == 200
    return await resp.text()


async def test_each_outcome_moves_its_series(gw: Harness, aiohttp_client) -> None:  # type: ignore[no-untyped-def]
    key = await gw.key(credits=2, rate_limit=100)
    broke = await gw.key(team="broke", credits=0)
    slow = await gw.key(team="slow", rate_limit=1, credits=5)
    await gw.client.post("/api/v1/assess", headers=bearer(key))  # ok
    gw.upstream.status = 404
    await gw.client.post("/api/v1/assess", headers=bearer(key))  # client_error (refunded)
    gw.upstream.status = 503
    await gw.client.post("/api/v1/assess", headers=bearer(key))  # upstream_error
    gw.upstream.status = 200
    await gw.client.post("/api/v1/assess")  # unauthorized
    await gw.client.post("/api/v1/assess", headers=bearer(slow))
    await gw.client.post("/api/v1/assess", headers=bearer(slow))  # rate_limited
    await gw.client.post("/api/v1/assess", headers=bearer(broke))  # insufficient_credits
    await gw.client.put("/api/v1/assess")  # not_found (405)
    await gw.client.get("/nowhere")  # not_found (404)
    await raw_http(
        gw.client, b"GET /api//v1/assess HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    text = await scrape(gw, aiohttp_client)
    assert requests_by_outcome(text) == {
        "ok": 2,  # the rate-limited key's first request succeeded too
        "client_error": 1,
        "upstream_error": 1,
        "unauthorized": 1,
        "rate_limited": 1,
        "insufficient_credits": 1,
        "not_found": 2,
        "bad_request": 1,
    }
    by_labels = samples(text, "gateway_requests_total")
    assert (
        by_labels[
            (
                ("method", "POST"),
                ("outcome", "upstream_error"),
                ("route", "/api/v1/assess"),
                ("status_class", "5xx"),
            )
        ]
        == 1
    )
    credits = {dict(k)["operation"]: v for k, v in samples(text, "gateway_credits_total").items()}
    assert credits["reserved"] == 4 and credits["posted"] == 2 and credits["voided"] == 2
    auth = {dict(k)["reason"]: v for k, v in samples(text, "gateway_auth_failures_total").items()}
    assert auth == {}  # a missing header is not a refused credential
    cache = {
        dict(k)["result"]: v for k, v in samples(text, "gateway_key_cache_lookups_total").items()
    }
    assert cache == {"miss": 3, "hit": 3}  # one miss per key, then memory
    limiter = samples(text, "gateway_rate_limit_decisions_total")
    assert limiter[(("limiter", "memory"), ("result", "rejected"))] == 1
    assert samples(text, "gateway_requests_in_flight")[()] == 0


@pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool is installed by scripts/test"
)
async def test_promtool_accepts_the_exposition(gw: Harness, aiohttp_client) -> None:  # type: ignore[no-untyped-def]
    assert shutil.which("promtool"), (
        "promtool is missing (scripts/test installs Debian's prometheus)"
    )
    key = await gw.key()
    await gw.client.post("/api/v1/assess", headers=bearer(key))
    await gw.client.post("/api/v1/assess", headers=bearer("ckiq_live_nope"))
    text = await scrape(gw, aiohttp_client)
    result = subprocess.run(
        ["promtool", "check", "metrics"], input=text.encode(), capture_output=True, check=False
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


async def test_team_labels_are_opt_in_and_capped(make_gateway: MakeGateway, aiohttp_client) -> None:  # type: ignore[no-untyped-def]
    gw = await make_gateway(metrics={"team_labels": True, "team_label_limit": 2})
    for name in ("a", "b", "c", "d"):
        key = await gw.key(team=name)
        await gw.client.post("/api/v1/assess", headers=bearer(key))
    teams = {
        dict(k)["team"]
        for k in samples(await scrape(gw, aiohttp_client), "gateway_team_requests_total")
    }
    assert len(teams) == 3 and "other" in teams


async def test_team_labels_off_by_default(gw: Harness, aiohttp_client) -> None:  # type: ignore[no-untyped-def]
    key = await gw.key()
    await gw.client.post("/api/v1/assess", headers=bearer(key))
    assert samples(await scrape(gw, aiohttp_client), "gateway_team_requests_total") == {}


async def test_logs_parse_and_hold_no_key_material(gw: Harness, captured_logs: io.StringIO) -> None:
    assert gw.gateway.access_log is not None  # on at the shipped default
    access_sink = io.BytesIO()
    gw.gateway.access_log.sink = access_sink
    key = await gw.key(credits=5)
    typo = key[:-1] + ("x" if key[-1] != "x" else "y")  # a bad checksum, never the key itself
    revoked = await gw.key(team="gone")
    await gw.client.post("/api/v1/assess", headers=bearer(key))
    await gw.client.post(f"/api/v1/assess?api_key={key}", headers=bearer(key))
    record = (await gw.gateway.management.keys("gone"))[0]
    await gw.gateway.management.revoke_key(record.id)
    await gw.gateway.keys.poll_once()
    await gw.client.post("/api/v1/assess", headers=bearer(revoked))
    await gw.client.post("/api/v1/assess", headers=bearer(typo))
    await gw.client.post("/api/v1/assess", headers={"Authorization": "Bearer some-other-secret"})
    gw.gateway.access_log.flush()
    text = captured_logs.getvalue() + access_sink.getvalue().decode()
    lines = [orjson.loads(line) for line in text.splitlines()]
    assert lines, "nothing was logged"
    for secret in (key, revoked, typo, "some-other-secret"):
        assert secret not in text
    access = [line for line in lines if line["logger"] == "gateway.access"]
    assert all(line["level"] == "info" and line["msg"] == "request" for line in access)
    assert len(access) == 5
    first = access[0]
    for field in (
        "request_id",
        "team_id",
        "key_id",
        "key_prefix",
        "route",
        "status",
        "outcome",
        "credits",
        "upstream_ms",
        "total_ms",
        "client_ip",
    ):
        assert field in first
    assert first["key_prefix"].startswith(key[:14])
    failures = [line for line in lines if line["msg"] == "auth failure"]
    by_reason = {line["reason"]: line for line in failures}
    assert by_reason["revoked_or_expired"]["key_id"] == record.id
    assert by_reason["revoked_or_expired"]["team_id"] == record.team_id
    malformed = [line["key_prefix"] for line in failures if line["reason"] == "malformed"]
    assert malformed == [key[:14], None]  # a bad checksum shows the prefix; junk shows nothing
    assert all(line["client_ip"] == "127.0.0.1" for line in failures)


def test_redaction() -> None:
    key = "ckiq_live_" + "A" * 32 + "000000"
    assert redact(f"GET /x?key={key}&y=1") == "GET /x?key=ckiq_live_AAAA…&y=1"
    assert "tok123" not in redact("Authorization: Bearer tok123")
    assert redact("nothing secret here") == "nothing secret here"


def _record(msg: str, args: tuple[object, ...], fields: dict[str, object]) -> logging.LogRecord:
    record = logging.LogRecord("gateway.test", logging.INFO, __file__, 1, msg, args, None)
    record.fields = fields
    return record


@pytest.mark.parametrize("style", ["json", "logfmt"])
def test_a_line_with_text_no_encoder_takes_is_still_written(style: str) -> None:
    # Header bytes that are not UTF-8 reach us as lone surrogates (surrogateescape).
    record = _record(
        "refused %s",
        ("ckiq_live_\udcff\udcfe",),
        {
            "client_ip": "10.0.0.1\udc80",
            "path": ["/a\udcff", {"nested\udcff": "b\udcfe"}],
            "huge": 2**70,
            "other": object(),
            "key": "ckiq_live_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789abcd",
        },
    )
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(LogFormatter(style))
    handler.emit(record)
    line = stream.getvalue()
    line.encode("utf-8", "strict")
    assert "ckiq_live_\\xff\\xfe" in line.replace("\\\\", "\\")
    assert "10.0.0.1\\x80" in line.replace("\\\\", "\\")
    assert "AbCdEfGh" not in line  # still redacted
    if style == "json":
        fields = orjson.loads(line)
        assert fields["msg"] == "refused ckiq_live_\\xff\\xfe"
        assert fields["client_ip"] == "10.0.0.1\\x80"
        assert fields["path"] == ["/a\\xff", {"nested\\xff": "b\\xfe"}]
        assert fields["huge"] == str(2**70)
        assert fields["other"].startswith("<object object at")
        assert fields["key"] == "ckiq_live_AbCd…"


def test_ordinary_lines_are_not_escaped() -> None:
    record = _record("two\nlines", (), {"agent": "café\tbar"})
    fields = orjson.loads(LogFormatter("json").format(record))
    assert fields["msg"] == "two\nlines" and fields["agent"] == "café\tbar"
