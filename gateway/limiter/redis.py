"""The Redis limiter: decisions batched into one Lua script call, with Redis ``TIME`` as the clock.

Every replica shares the buckets, so a limit holds across the whole fleet. The
script is :func:`gateway.limiter.decide` done in integer microseconds: a
theoretical arrival time (TAT) is stored exactly, so adding intervals to it
never drifts, and the server's clock means replicas with skewed clocks still
agree. All buckets of one decision share one hash tag (the group), so on Redis
Cluster a decision runs on a single slot.

Concurrent decisions are micro-batched (:class:`gateway.batching.Grouper`):
one ``EVALSHA`` carries every decision that arrived while the previous call
was out, and the script takes them in order, each seeing the ones before it,
exactly as separate calls would. Alone, a decision still goes out at once.
On Cluster a batch only holds decisions of one group (one slot).

A request's calendar quotas (gateway/caps.py) ride in the same call: once its
rate limits admit it, the script takes one from each of its quota counts, all
or nothing, so a quota costs no round trip of its own.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Final

import redis.asyncio
from redis.asyncio import BlockingConnectionPool
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError

from gateway.batching import Grouper
from gateway.config import LimiterSettings
from gateway.limiter import Decision, Limit, LimiterUnavailable
from gateway.storage.quotas import QuotaCount, QuotaTake

__all__ = ["RedisLimiter", "bucket_key"]

_US: Final = 1_000_000
_MINUTE_US: Final = 60 * _US
_MAX_CONNECTIONS: Final = 100

# A batch of decisions. ARGV[1] is one string of decimal numbers (one argument
# instead of three a decision: redis-py encodes each argument in Python), per
# decision: its number of buckets n, then n pairs of interval and capacity in
# µs; its n buckets are the next n KEYS. Then its number of quota counts m, their
# m limits and their m expiry times (epoch seconds); its counts are the next m
# KEYS.
# Per decision the reply holds six numbers: when admitted
# {1, remaining, reset_after, next_after, 0, room}, room being the fewest
# requests any of its buckets still admits; when refused
# {0, remaining_before, reset_before, retry_after, index of the limit that refused, 0}.
# With m > 0, 1 + m more: 1 if its quotas were taken (else 0), then each count's
# use, after the request when taken, as found when full (0s when rate-limited:
# a refused request does not count against its quotas).
# Lua numbers are doubles: µs since the epoch (~2^51) are still exact integers,
# and string.format keeps them out of tostring()'s 14-digit rounding.
_SCRIPT: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local args = {}
for v in string.gmatch(ARGV[1], '%d+') do args[#args + 1] = tonumber(v) end
local out = {}
local k, a = 0, 1
while a <= #args do
  local n = args[a]
  local tats = {}
  local remaining, reset_after, remaining_before, reset_before
  local next_after, worst, worst_wait = 0, 0, 0
  local room
  for i = 1, n do
    local interval = args[a + 2 * i - 1]
    local capacity = args[a + 2 * i]
    local base = tonumber(redis.call('GET', KEYS[k + i]))
    if not base or base < now then base = now end
    local ahead = base + interval - now
    if ahead <= capacity then
      tats[i] = base + interval
      local wait = ahead + interval - capacity
      if wait > next_after then next_after = wait end
      local left = math.floor((capacity - ahead) / interval)
      if not room or left < room then room = left end
      if i == 1 then
        remaining = left
        reset_after = ahead
        remaining_before = math.floor((capacity - (base - now)) / interval)
      end
    else
      if ahead - capacity > worst_wait then worst, worst_wait = i, ahead - capacity end
      if i == 1 then remaining_before = 0 end
    end
    if i == 1 then reset_before = base - now end
  end
  local o = #out
  if worst > 0 then
    out[o + 1], out[o + 2], out[o + 3], out[o + 4], out[o + 5], out[o + 6] =
      0, remaining_before, reset_before, worst_wait, worst - 1, 0
  else
    for i = 1, n do
      -- The key expires when its bucket is full again: a missing key means a full bucket.
      redis.call('SET', KEYS[k + i], string.format('%.0f', tats[i]),
        'PXAT', string.format('%.0f', math.ceil(tats[i] / 1000)))
    end
    out[o + 1], out[o + 2], out[o + 3], out[o + 4], out[o + 5], out[o + 6] =
      1, remaining, reset_after, next_after, 0, room
  end
  k = k + n
  a = a + 2 * n + 1
  -- Its calendar quotas: m counts, their m limits and m expiry times (epoch seconds).
  local m = args[a]
  if m > 0 then
    local used, full = {}, false
    if worst == 0 then
      for i = 1, m do
        used[i] = tonumber(redis.call('GET', KEYS[k + i]) or '0')
        if used[i] >= args[a + i] then full = true end
      end
    end
    out[#out + 1] = (worst == 0 and not full) and 1 or 0
    for i = 1, m do
      if worst == 0 and not full then
        used[i] = redis.call('INCR', KEYS[k + i])
        redis.call('EXPIREAT', KEYS[k + i], string.format('%d', args[a + m + i]))
      end
      out[#out + 1] = used[i] or 0
    end
  end
  k = k + m
  a = a + 2 * m + 1
end
return out
"""
# A batch holds this many decisions at most: the script runs them all while
# Redis serves nobody else, so a batch must stay short (256 take ~0.3 ms).
_MAX_BATCH: Final = 256

_REDIS_ERRORS: Final = (RedisError, RedisClusterException, OSError)


def bucket_key(group: str, bucket: str) -> str:
    """The Redis key of ``bucket``; ``{group}`` is the hash tag keeping a decision on one slot."""
    # An empty tag would hash each whole key on its own, scattering one decision's keys.
    return f"gw:rl:{{{group or '_'}}}:{bucket}"


@functools.lru_cache(maxsize=4096)
def _encoded_key(group: str, bucket: str) -> bytes:
    # Bytes go through redis-py's encoder untouched; a busy key is built once.
    return bucket_key(group, bucket).encode()


def _interval_us(limit: Limit) -> int:
    # Rounded up, so that rounding can never admit more than per_minute a minute.
    return -(-_MINUTE_US // limit.per_minute)


class RedisLimiter:
    """GCRA buckets in Redis (single node or Cluster); one ``EVALSHA`` per batch of decisions.

    Raises :class:`LimiterUnavailable` when Redis cannot be reached or fails; the
    failure policy around it is :class:`gateway.limiter.fallback.FallbackLimiter`'s.
    """

    def __init__(self, settings: LimiterSettings) -> None:
        options = {
            "socket_timeout": settings.timeout_seconds,
            "socket_connect_timeout": settings.timeout_seconds,
            # One immediate retry renews a pooled connection the server dropped;
            # redis-py's default (up to ten, with backoff) stalls a request for seconds.
            "retry": Retry(NoBackoff(), 1),
        }
        self._client: redis.asyncio.Redis | RedisCluster
        self._cluster = settings.cluster
        if settings.cluster:
            self._client = RedisCluster.from_url(settings.url, **options)
        else:
            # A burst of requests waits briefly for a pooled connection instead of
            # failing (the default pool raises) or opening connections without bound.
            pool = BlockingConnectionPool.from_url(
                settings.url,
                max_connections=_MAX_CONNECTIONS,
                timeout=settings.timeout_seconds,
                **options,
            )
            self._client = redis.asyncio.Redis.from_pool(pool)
        self._script = self._client.register_script(_SCRIPT)
        # One batcher for a single node; on Cluster one per group (a batch must
        # stay on one slot), dropped again when its group goes quiet.
        self._batchers: dict[str, Grouper[_Pending, Decision]] = {}

    async def check(
        self, limits: Sequence[Limit], group: str, quotas: Sequence[QuotaCount] = ()
    ) -> Decision:
        return await self._batcher(group).submit((limits, group, quotas))

    def _batcher(self, group: str) -> Grouper[_Pending, Decision]:
        """One batcher on a single node; on Cluster one per group (a batch must stay on one
        slot), dropped again when its group goes quiet."""
        tag = group if self._cluster else ""
        batcher = self._batchers.get(tag)
        if batcher is None:
            batcher = Grouper(
                functools.partial(self._decide_many, group),
                max_batch=_MAX_BATCH,
                on_idle=functools.partial(_forget, self._batchers, tag) if self._cluster else None,
            )
            self._batchers[tag] = batcher
        return batcher

    async def _decide_many(self, group: str, batch: Sequence[_Pending]) -> list[Decision]:
        keys: list[bytes] = []
        args: list[int] = []
        for limits, decision_group, quotas in batch:
            args.append(len(limits))
            for limit in limits:
                keys.append(_encoded_key(decision_group, limit.bucket))
                interval = _interval_us(limit)
                args += (interval, interval * limit.burst)
            args.append(len(quotas))
            if quotas:
                args += [c.limit for c in quotas]
                # A count lives a day past its period's end, so clocks a little apart agree.
                args += [int(c.ends_at) + 86_400 for c in quotas]
                keys += [_encoded_key(decision_group, f"q:{c.subject}:{c.period}") for c in quotas]
        try:
            reply = await self._script(keys, [" ".join(map(str, args))])
        except _REDIS_ERRORS as exc:
            raise LimiterUnavailable(f"Redis: {exc}") from exc
        decisions, at = [], 0
        for limits, _, quotas in batch:
            decision = _decision(limits, reply, at)
            at += _REPLY
            if quotas:
                m = len(quotas)
                if decision.allowed:
                    used = tuple(int(u) for u in reply[at + 1 : at + 1 + m])
                    decision = replace(decision, quota=QuotaTake(bool(reply[at]), used))
                at += 1 + m
            decisions.append(decision)
        return decisions

    async def close(self) -> None:
        await self._client.aclose()


def _forget(batchers: dict[str, Any], tag: str) -> None:
    batchers.pop(tag, None)


_Pending = tuple[Sequence[Limit], str, Sequence[QuotaCount]]
_REPLY: Final = 6  # numbers per decision in the script's reply


def _decision(limits: Sequence[Limit], reply: Sequence[int], at: int) -> Decision:
    own = limits[0].per_minute
    if reply[at]:
        return Decision(
            True, own, reply[at + 1], reply[at + 2] / _US, reply[at + 3] / _US, room=reply[at + 5]
        )
    wait: float = reply[at + 3] / _US
    return Decision(
        False,
        own,
        reply[at + 1],
        reply[at + 2] / _US,
        wait,
        retry_after=wait,
        rejected_limit=limits[reply[at + 4]].per_minute,
    )
