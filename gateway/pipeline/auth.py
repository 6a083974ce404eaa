"""Authentication: the bearer key, the key cache, and the budget for lookups that find nothing."""

from __future__ import annotations

import logging
import time

from aiohttp import web

from gateway import errors
from gateway.anomaly import AnomalyDetector
from gateway.keycache import CacheMiss, KeyCache
from gateway.keys import display_prefix, hash_secret, parse_key
from gateway.limiter import Limit, LocalLimiter
from gateway.metrics import Metrics
from gateway.models import KeyRecord
from gateway.pipeline.exchange import Exchange
from gateway.storage import StorageError
from gateway.text import safe_text
from gateway.usage import UsageRecorder

__all__ = ["Authenticator"]

log = logging.getLogger("gateway.pipeline")


class Authenticator:
    def __init__(
        self,
        keys: KeyCache,
        *,
        pepper: bytes | None,
        lookups: LocalLimiter,
        unknown_keys_per_minute: int,
        metrics: Metrics,
        usage: UsageRecorder,
        anomalies: AnomalyDetector | None,
    ) -> None:
        self._keys = keys
        self._pepper = pepper
        self._lookups = lookups
        self._unknown_per_minute = unknown_keys_per_minute
        self._metrics = metrics
        self._usage = usage
        self._anomalies = anomalies

    async def authenticate(self, request: web.BaseRequest, ex: Exchange) -> KeyRecord:
        """The live key the request carries, or a :class:`Refusal` (401, 429, 503)."""
        header = request.headers.get("Authorization")
        if header is None:
            raise errors.refuse_missing_key()
        scheme, _, token = header.partition(" ")
        parsed = parse_key(token.strip()) if scheme.lower() == "bearer" else None
        if parsed is None:
            raise self._invalid(ex, "malformed", token)
        key_hash = hash_secret(parsed.text, self._pepper)
        record = self._keys.cached(key_hash)
        if isinstance(record, CacheMiss):
            # Only lookups the cache cannot answer cost the store anything, so only
            # they count against the client address's budget: brute force is
            # throttled, while keys already in memory keep working from that address.
            # Requests that join a lookup already under way cost nothing more.
            if not self._keys.loading(key_hash):
                self._check_lookup_budget(ex)
            try:
                record = await self._keys.load(key_hash)
            except StorageError:
                raise errors.refuse_unavailable() from None
        if record is None:
            budget = self._unknown_key_budget(ex)
            if budget is not None:
                self._lookups.check_now([budget], time.monotonic())
            raise self._invalid(ex, "unknown", parsed.text)
        ex.key = record  # a refused known key is logged as the key that was tried
        if not record.usable_at(time.time()):
            raise self._invalid(ex, "revoked_or_expired", parsed.text)
        return record

    def _unknown_key_budget(self, ex: Exchange) -> Limit | None:
        per_minute = self._unknown_per_minute
        return Limit("ip:" + ex.client_ip, per_minute, per_minute) if per_minute else None

    def _check_lookup_budget(self, ex: Exchange) -> None:
        """Refuse a store lookup to an address that has sent too many unknown keys.

        Only lookups that find no key are charged (after the fact), so valid keys
        never spend the budget; once it is spent, keys the cache does not know
        are refused from that address until it refills. Decided in this process:
        no remote call, and with N replicas an address gets N budgets, which
        still bounds brute force.
        """
        limit = self._unknown_key_budget(ex)
        if limit is None:
            return
        decision = self._lookups.peek_now([limit], time.monotonic())
        if decision.allowed:
            return
        self._metrics.auth_failures.labels("throttled").inc()
        log.info(
            "key lookups throttled",
            extra={"fields": {"request_id": ex.request_id, "client_ip": ex.client_ip}},
        )
        raise errors.refuse_rate_limited(decision.retry_after, limit.per_minute)

    def _invalid(self, ex: Exchange, reason: str, token: str) -> errors.Refusal:
        self._metrics.auth_failures.labels(reason).inc()
        key = ex.key
        # The token's bytes are the client's: whatever they are, what is recorded
        # is text every writer can store (tests/admin/test_auth_failure_evidence.py).
        prefix = safe_text(display_prefix(token)) if token.startswith("ckiq_") else None
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
        return errors.refuse_invalid_key()
