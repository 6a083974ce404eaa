"""The delivery worker: one per process, sharing the queue in the store with every other.

Each pass: write the events only this process knows (anomalies it raised, keys
whose expiry passed), fan new events out to endpoints, claim what is due and
send it, signed; record each attempt and what follows (done, again later with
backoff and jitter, given up, the endpoint disabled after a day of failures).
A claim is a lease: a process killed mid-send leaves the delivery due again
when the lease ends, to be sent with the same ``webhook-id`` (at least once).
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import time
from urllib.parse import urlsplit

import aiohttp
import orjson

from gateway.anomaly import Anomaly
from gateway.config import WebhookSettings
from gateway.events.guard import GuardedResolver, RefusedAddress, refused_address
from gateway.events.signing import signature_header
from gateway.manage import iso
from gateway.metrics import Metrics
from gateway.storage import EventRecord, EventStore
from gateway.storage.events import AttemptResult, DueDelivery

__all__ = ["DeliveryWorker", "next_attempt"]

log = logging.getLogger("gateway.webhooks")

# What is read of a receiver's answer: enough for an error line, never more.
MAX_ANSWER_BYTES = 4096
_MAX_ERROR = 200
_MAX_BUFFERED_ANOMALIES = 1000
_EXPIRY_CHECK_SECONDS = 60.0
_EXPIRY_LOOKBACK_SECONDS = 86400.0
_PRUNE_SECONDS = 3600.0
# The queue's size is sampled for the metrics this often (a count over the pending
# deliveries: cheap when the queue is short, not to be run every poll when it is long).
_SAMPLE_SECONDS = 10.0
_DISPATCH_BATCH = 500


def next_attempt(
    schedule: tuple[float, ...], attempts: int, now: float, retry_after: float | None
) -> float | None:
    """When to try again after ``attempts`` failed attempts; None once the schedule is spent.

    Each wait is jittered ±20 % so receivers coming back are not hit in step;
    a receiver's ``Retry-After`` is honoured up to the schedule's longest wait.
    """
    if attempts > len(schedule):
        return None
    wait = schedule[attempts - 1] * random.uniform(0.8, 1.2)
    if retry_after is not None:
        wait = max(wait, min(retry_after, max(schedule)))
    return now + wait


def _retry_after(value: str | None, now: float) -> float | None:
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        return email.utils.parsedate_to_datetime(value).timestamp() - now
    except (TypeError, ValueError):
        return None


class DeliveryWorker:
    def __init__(
        self, store: EventStore, settings: WebhookSettings, metrics: Metrics | None = None
    ) -> None:
        self._store = store
        self._settings = settings
        self._metrics = metrics
        self._anomalies: list[EventRecord] = []
        self._session: aiohttp.ClientSession | None = None
        # The first look reaches a day back: keys that expired while no gateway ran are
        # told too (each expiry once: the event's dedupe key).
        self._last_expiry_check = 0.0
        self._last_prune = 0.0
        self._last_sample = 0.0
        self.dropped_anomalies = 0

    def anomaly(self, anomaly: Anomaly) -> None:
        """An anomaly this process raised: told to the team's endpoints on the next pass."""
        if anomaly.team_id is None:
            return  # about an address or a prefix no team owns
        if len(self._anomalies) >= _MAX_BUFFERED_ANOMALIES:
            self.dropped_anomalies += 1
            return
        data = {"team_id": anomaly.team_id, "kind": anomaly.kind, "key_id": anomaly.subject,
                "observed": anomaly.observed, "threshold": anomaly.threshold,
                "detail": anomaly.detail, "at": iso(anomaly.at)}  # fmt: skip
        # Replicas judge their own traffic: one event per signal, subject and minute.
        once = f"anomaly:{anomaly.kind}:{anomaly.subject}:{int(anomaly.at // 60)}"
        self._anomalies.append(EventRecord("anomaly.detected", anomaly.team_id, data, once))

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                resolver=GuardedResolver(self._settings.allow_private_addresses),
                limit=self._settings.concurrency,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=self._settings.timeout_seconds),
                headers={"User-Agent": "gateway-webhooks/1"},
                auto_decompress=False,
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def run(self) -> None:
        try:
            while True:
                try:
                    await self.step()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("webhook deliveries failed, will try again: %s", exc)
                await asyncio.sleep(self._settings.poll_interval_seconds)
        finally:
            await self.close()

    async def step(self) -> int:
        """One pass; how many deliveries were attempted."""
        await self._write_local_events()
        while await self._store.dispatch_events(_DISPATCH_BATCH) == _DISPATCH_BATCH:
            pass
        # Long enough for the send to end (or time out) and its result to be written.
        lease = 2 * self._settings.timeout_seconds + 1.0
        due = await self._store.claim_deliveries(lease, self._settings.concurrency)
        if due:
            session = self._open()
            results = await asyncio.gather(*(self._send(session, d) for d in due))
            for result in results:
                await self._store.record_attempt(result)
        await self._sample_queue()
        return len(due)

    async def _write_local_events(self) -> None:
        if self._anomalies:
            told, self._anomalies = self._anomalies, []
            await self._store.add_events(told)
        now = time.time()
        if now - self._last_expiry_check >= _EXPIRY_CHECK_SECONDS:
            since = max(self._last_expiry_check, now - _EXPIRY_LOOKBACK_SECONDS) - 5.0
            await self._store.add_expired_key_events(since, now)
            self._last_expiry_check = now
        if now - self._last_prune >= _PRUNE_SECONDS:
            self._last_prune = now
            await self._store.prune_events(now - self._settings.retention_days * 86400, 5000)

    async def _sample_queue(self) -> None:
        now = time.monotonic()
        if self._metrics is None or now - self._last_sample < _SAMPLE_SECONDS:
            return
        self._last_sample = now
        queue = await self._store.webhook_queue()
        self._metrics.webhook_queue.set(queue.pending)
        self._metrics.webhook_queue_age.set(queue.oldest_due_seconds)

    async def _send(self, session: aiohttp.ClientSession, delivery: DueDelivery) -> AttemptResult:
        started = time.time()
        body = _body(delivery)
        stamp = int(started)
        headers = {
            "Content-Type": "application/json",
            "webhook-id": delivery.event_id,
            "webhook-timestamp": str(stamp),
            "webhook-signature": signature_header(delivery.secrets, delivery.event_id, stamp, body),
        }
        status: int | None = None
        error: str | None = None
        retry_after: float | None = None
        host = urlsplit(delivery.url).hostname or ""
        refused = None if self._settings.allow_private_addresses else refused_address(host)
        try:
            if refused is not None:
                raise aiohttp.ClientConnectionError(refused)
            async with session.post(
                delivery.url, data=body, headers=headers, allow_redirects=False
            ) as answer:
                status = answer.status
                await answer.content.read(MAX_ANSWER_BYTES)
                retry_after = _retry_after(answer.headers.get("Retry-After"), time.time())
                if not 200 <= status < 300:
                    error = f"the receiver answered {status}"
        except TimeoutError:
            error = f"no answer within {self._settings.timeout_seconds:g} s"
        except aiohttp.ClientConnectorError as exc:
            # The guard's refusal reaches here wrapped: say it, not "cannot connect".
            cause = exc.os_error if isinstance(exc.os_error, RefusedAddress) else exc
            error = (str(cause) or type(cause).__name__)[:_MAX_ERROR]
        except aiohttp.ClientError as exc:
            error = (str(exc) or type(exc).__name__)[:_MAX_ERROR]
        return self._result(delivery, started, status, error, retry_after)

    def _result(
        self,
        delivery: DueDelivery,
        started: float,
        status: int | None,
        error: str | None,
        retry_after: float | None,
    ) -> AttemptResult:
        now = time.time()
        latency = round((now - started) * 1000, 3)
        if error is None:
            self._count("delivered")
            return AttemptResult(delivery.id, started, status, latency, None, "delivered",
                                 None, None)  # fmt: skip
        again = next_attempt(
            self._settings.retry_schedule_seconds, delivery.attempts, now, retry_after
        )
        failing_since = delivery.failing_since if delivery.failing_since is not None else now
        disable = None
        if now - failing_since >= self._settings.disable_after_seconds:
            disable = f"no successful delivery since {iso(failing_since)}"
        self._count("failed" if again is None else "retry")
        log.info("webhook delivery %s to %s failed (attempt %d): %s",
                 delivery.id, delivery.endpoint_id, delivery.attempts, error)  # fmt: skip
        return AttemptResult(
            delivery.id, started, status, latency, error,
            "failed" if again is None else "pending", again, disable,
        )  # fmt: skip

    def _count(self, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.webhook_deliveries.labels(outcome).inc()


def _body(delivery: DueDelivery) -> bytes:
    """``{"type", "timestamp", "data"}``, the data as the event stored it."""
    data = orjson.Fragment(delivery.data)
    return orjson.dumps({"type": delivery.event_type, "timestamp": iso(delivery.event_at),
                         "data": data})  # fmt: skip
