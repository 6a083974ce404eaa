"""The delivery worker against real receivers on loopback, on both backends.

Signatures are checked by the receiver with its own reading of the Standard
Webhooks specification (below), written apart from the gateway's signer.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from prometheus_client import generate_latest

from gateway.anomaly import Anomaly
from gateway.config import WebhookSettings
from gateway.events.worker import DeliveryWorker, next_attempt
from gateway.metrics import Metrics
from gateway.storage import Backend, EventRecord
from tests.storage.conftest import (
    Backends,
    backends,
    databases,
    postgres_admin_dsn,
    postgres_template,
)

__all__ = ["backends", "databases", "postgres_admin_dsn", "postgres_template"]

FAST = WebhookSettings(
    allow_private_addresses=True,
    poll_interval_seconds=0.05,
    timeout_seconds=1.0,
    retry_schedule_seconds=(0.2, 0.2, 0.2),
)


def verify(secret: str, headers: Any, body: bytes, tolerance: float = 300.0) -> bool:
    """The receiver's check, from the specification: any listed v1 signature over
    "{id}.{timestamp}.{body}" with the secret's base64 key, timestamp within tolerance."""
    msg_id, stamp = headers["webhook-id"], headers["webhook-timestamp"]
    if abs(time.time() - int(stamp)) > tolerance:
        return False
    key = base64.b64decode(secret.split("_", 1)[1])
    expected = hmac.new(key, b"%s.%s.%s" % (msg_id.encode(), stamp.encode(), body),
                        hashlib.sha256).digest()  # fmt: skip
    for part in headers["webhook-signature"].split(" "):
        version, _, sig = part.partition(",")
        if version == "v1" and hmac.compare_digest(base64.b64decode(sig), expected):
            return True
    return False


@dataclass
class Receiver:
    """A webhook receiver on loopback: answers from a script, keeps what it got."""

    answers: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    got: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    hold: asyncio.Event | None = None
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.got.append((dict(request.headers), body))
        if self.hold is not None:
            await self.hold.wait()
        status, headers = self.answers.pop(0) if self.answers else (200, {})
        return web.Response(status=status, headers=headers, text="ok")

    def ids(self) -> list[str]:
        return [h["webhook-id"] for h, _ in self.got]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    made = Receiver()
    app = web.Application()
    app.router.add_post("/hook", made.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    made.url = f"http://127.0.0.1:{port}/hook"
    yield made
    if made.hold is not None:
        made.hold.set()
    await runner.cleanup()


async def until(check: Any, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def drive(worker: DeliveryWorker, check: Any, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await worker.step()
        await asyncio.sleep(0.02)


async def deliver(db: Backend, check: Any, settings: WebhookSettings = FAST) -> None:
    """Run a worker over ``db`` until ``check()`` holds, then close it."""
    worker = DeliveryWorker(db, settings)
    try:
        await drive(worker, check)
    finally:
        await worker.close()


async def team_with_endpoint(db: Backend, url: str, events: list[str] | None = None,
                             ) -> tuple[str, str, str]:  # fmt: skip
    team = (await db.create_team("t")).id
    secret = "whsec_" + base64.b64encode(b"k" * 24).decode()
    hook = await db.create_webhook(team, url, "", events or ["*"], secret)
    return team, hook.id, secret


async def test_an_event_arrives_signed_verifiable_and_shaped_as_the_contract_says(
    backends: Backends, receiver: Receiver
) -> None:
    db = await backends.open()
    team, _, secret = await team_with_endpoint(db, receiver.url)
    await db.add_events([EventRecord("key.created", team, {"team_id": team, "key_id": "key_1",
                                                            "prefix": "ckiq_live_ab"})])  # fmt: skip
    await deliver(db, lambda: receiver.got)
    [(headers, body)] = receiver.got
    assert verify(secret, headers, body)
    assert not verify(secret, headers, body + b" ")  # a check that can fail
    assert headers["webhook-id"].startswith("evt_")
    assert headers["Content-Type"] == "application/json"
    shown = orjson.loads(body)
    assert set(shown) == {"type", "timestamp", "data"}
    assert shown["type"] == "key.created" and shown["timestamp"].endswith("Z")
    assert shown["data"] == {"team_id": team, "key_id": "key_1", "prefix": "ckiq_live_ab"}


async def test_a_receiver_down_then_up_gets_the_event_once_after_backoff(
    backends: Backends, receiver: Receiver
) -> None:
    db = await backends.open()
    team, hook, _ = await team_with_endpoint(db, receiver.url)
    receiver.answers = [(503, {}), (503, {"Retry-After": "0"})]
    await db.add_events([EventRecord("credits.granted", team, {"team_id": team})])
    worker = DeliveryWorker(db, FAST)
    try:
        await drive(worker, lambda: len(receiver.got) == 3)
        for _ in range(10):  # delivered: nothing more is sent
            await worker.step()
            await asyncio.sleep(0.03)
    finally:
        await worker.close()
    assert len(set(receiver.ids())) == 1 and len(receiver.got) == 3
    attempts = await db.delivery_attempts(hook, 10)
    assert [(a.status, a.state) for a in attempts] == [
        (200, "delivered"), (503, "delivered"), (503, "delivered")
    ]
    assert attempts[1].error == "the receiver answered 503"


async def test_retries_end_and_a_failing_endpoint_is_disabled_which_is_told(
    backends: Backends, receiver: Receiver
) -> None:
    db = await backends.open()
    team, hook, _ = await team_with_endpoint(db, receiver.url, ["key.created"])
    watcher = await db.create_webhook(team, receiver.url + "?watch", "", ["webhook.disabled"],
                                      "whsec_" + base64.b64encode(b"w" * 24).decode())  # fmt: skip
    receiver.answers = [(500, {})] * 4
    settings = FAST.model_copy(update={"disable_after_seconds": 0.3})
    await db.add_events([EventRecord("key.created", team, {})])
    worker = DeliveryWorker(db, settings)
    try:
        await drive(worker, lambda: any(b"webhook.disabled" in body for _, body in receiver.got))
    finally:
        await worker.close()
    shown = await db.get_webhook(hook)
    assert not shown.enabled and shown.disabled_reason is not None
    told = [orjson.loads(b) for _, b in receiver.got if b"webhook.disabled" in b]
    assert [t["data"]["webhook_id"] for t in told] == [hook]
    assert watcher.enabled


async def test_a_rotated_secret_signs_beside_the_old_one_during_its_grace(
    backends: Backends, receiver: Receiver
) -> None:
    db = await backends.open()
    team, hook, old = await team_with_endpoint(db, receiver.url)
    new = "whsec_" + base64.b64encode(b"n" * 24).decode()
    await db.rotate_webhook_secret(hook, new, time.time() + 60)
    await db.add_events([EventRecord("key.revoked", team, {})])
    await deliver(db, lambda: receiver.got)
    [(headers, body)] = receiver.got
    assert len(headers["webhook-signature"].split(" ")) == 2
    assert verify(old, headers, body) and verify(new, headers, body)


async def test_two_workers_on_one_database_deliver_each_event_once(
    backends: Backends, receiver: Receiver
) -> None:
    first, second = await backends.open(), await backends.open()
    team, _, _ = await team_with_endpoint(first, receiver.url)
    await first.add_events([EventRecord("key.created", team, {"n": n}) for n in range(30)])
    workers = [DeliveryWorker(db, FAST) for db in (first, second)]
    try:
        async def run(worker: DeliveryWorker) -> None:
            for _ in range(60):
                await worker.step()
                if len(receiver.got) >= 30:
                    return
                await asyncio.sleep(0.01)

        await asyncio.gather(*(run(w) for w in workers))
    finally:
        for worker in workers:
            await worker.close()
    assert len(receiver.got) == 30 and len(set(receiver.ids())) == 30


async def test_private_receivers_are_refused_unless_allowed(
    backends: Backends, receiver: Receiver
) -> None:
    db = await backends.open()
    team, hook, _ = await team_with_endpoint(db, receiver.url)
    await db.add_events([EventRecord("key.created", team, {})])
    guarded = DeliveryWorker(db, FAST.model_copy(update={"allow_private_addresses": False}))
    try:
        await guarded.step()
    finally:
        await guarded.close()
    assert receiver.got == []
    [attempt] = await db.delivery_attempts(hook, 10)
    assert attempt.status is None and "not a public address" in (attempt.error or "")
    # A name is checked by the resolver at connection time (what DNS rebinding would need).
    by_name = receiver.url.replace("127.0.0.1", "localhost")
    await db.update_webhook(hook, {"url": by_name})
    await db.add_events([EventRecord("key.revoked", team, {})])
    guarded = DeliveryWorker(db, FAST.model_copy(update={"allow_private_addresses": False}))
    try:
        for _ in range(3):
            await guarded.step()
    finally:
        await guarded.close()
    assert receiver.got == []
    errors = [a.error or "" for a in await db.delivery_attempts(hook, 10)]
    assert any("deliveries may not go to" in e for e in errors), errors


def test_backoff_grows_with_jitter_honours_retry_after_and_ends() -> None:
    schedule = (5.0, 300.0, 1800.0)
    waits = [next_attempt(schedule, 2, 0.0, None) or 0 for _ in range(200)]
    assert min(waits) >= 240 and max(waits) <= 360 and len(set(waits)) > 100
    assert (next_attempt(schedule, 1, 0.0, 120.0) or 0) >= 120
    assert (next_attempt(schedule, 1, 0.0, 10**9) or 0) <= 1800  # capped
    assert next_attempt(schedule, 4, 0.0, None) is None


async def test_the_readme_receiver_verifies_a_real_delivery(
    backends: Backends, receiver: Receiver
) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    [snippet] = [block for block in readme.split("```python\n")[1:] if "def verified" in block]
    namespace: dict[str, Any] = {}
    exec(snippet.split("```")[0], namespace)  # the README's own example, run as written
    db = await backends.open()
    team, _, secret = await team_with_endpoint(db, receiver.url)
    await db.add_events([EventRecord("credits.low", team, {"team_id": team})])
    await deliver(db, lambda: receiver.got)
    [(headers, body)] = receiver.got
    assert namespace["verified"](secret, headers, body)
    assert not namespace["verified"](secret, headers, body.replace(b"low", b"lox"))


async def test_an_anomaly_is_told_once_per_signal_subject_and_minute(
    backends: Backends, receiver: Receiver
) -> None:
    first, second = await backends.open(), await backends.open()
    team, _, _ = await team_with_endpoint(first, receiver.url, ["anomaly.detected"])
    at = time.time()
    seen = Anomaly("rate_spike", at, "key_1", team, 90.0, 60.0, "90 requests in 60 s")
    workers = [DeliveryWorker(db, FAST) for db in (first, second)]
    try:
        for worker in workers:  # both replicas saw it
            worker.anomaly(seen)
            worker.anomaly(Anomaly("auth_failures", at, "10.0.0.1", None, 9, 5, "no team"))
        await drive(workers[0], lambda: receiver.got)
        for worker in workers:
            await worker.step()
    finally:
        for worker in workers:
            await worker.close()
    [(_, body)] = receiver.got
    data = orjson.loads(body)["data"]
    assert (data["kind"], data["key_id"], data["team_id"]) == ("rate_spike", "key_1", team)


async def test_a_redirect_is_not_followed(backends: Backends, receiver: Receiver) -> None:
    db = await backends.open()
    team, hook, _ = await team_with_endpoint(db, receiver.url)
    receiver.answers = [(307, {"Location": receiver.url + "?elsewhere"})]
    await db.add_events([EventRecord("key.created", team, {})])
    worker = DeliveryWorker(db, FAST)
    try:
        await drive(worker, lambda: receiver.got)
        await asyncio.sleep(0.1)
    finally:
        await worker.close()
    assert len(receiver.got) == 1
    [attempt] = await db.delivery_attempts(hook, 10)
    assert (attempt.status, attempt.state) == (307, "pending")


async def test_the_worker_counts_attempts_and_samples_its_queue(
    backends: Backends, receiver: Receiver
) -> None:
    db = await backends.open()
    team, _, _ = await team_with_endpoint(db, receiver.url)
    receiver.answers = [(500, {})]
    await db.add_events([EventRecord("key.created", team, {})])
    metrics = Metrics()
    worker = DeliveryWorker(db, FAST, metrics)
    try:
        await worker.step()
    finally:
        await worker.close()
    text = generate_latest(metrics.collector_registry()).decode()
    assert 'gateway_webhook_deliveries_total{outcome="retry"} 1.0' in text
    assert "gateway_webhook_queue_pending 1.0" in text
