"""The Redis limiter: one Lua script per decision, with Redis ``TIME`` as the clock.

Every replica shares the buckets, so a limit holds across the whole fleet. The
script is :func:`gateway.limiter.decide` done in integer microseconds: a
theoretical arrival time (TAT) is stored exactly, so adding intervals to it
never drifts, and the server's clock means replicas with skewed clocks still
agree. All buckets of one decision share one hash tag (the group), so on Redis
Cluster the script runs on a single slot.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import redis.asyncio
from redis.asyncio import BlockingConnectionPool
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError

from gateway.config import LimiterSettings
from gateway.limiter import Decision, Limit, LimiterUnavailable

__all__ = ["RedisLimiter", "bucket_key"]

_US: Final = 1_000_000
_MINUTE_US: Final = 60 * _US
_MAX_CONNECTIONS: Final = 100

# KEYS[i] is bucket i; ARGV[2i-1] and ARGV[2i] are its interval and capacity in µs.
# Reply when admitted: {1, remaining, reset_after, next_after}; when refused:
# {0, remaining_before, reset_before, retry_after, index of the limit that refused}.
# Lua numbers are doubles: µs since the epoch (~2^51) are still exact integers,
# and string.format keeps them out of tostring()'s 14-digit rounding.
_SCRIPT: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tats = {}
local remaining, reset_after, remaining_before, reset_before
local next_after, worst, worst_wait = 0, 0, 0
for i = 1, #KEYS do
  local interval = tonumber(ARGV[2 * i - 1])
  local capacity = tonumber(ARGV[2 * i])
  local base = tonumber(redis.call('GET', KEYS[i]))
  if not base or base < now then base = now end
  local ahead = base + interval - now
  if ahead <= capacity then
    tats[i] = base + interval
    local wait = ahead + interval - capacity
    if wait > next_after then next_after = wait end
    if i == 1 then
      remaining = math.floor((capacity - ahead) / interval)
      reset_after = ahead
      remaining_before = math.floor((capacity - (base - now)) / interval)
    end
  else
    if ahead - capacity > worst_wait then worst, worst_wait = i, ahead - capacity end
    if i == 1 then remaining_before = 0 end
  end
  if i == 1 then reset_before = base - now end
end
if worst > 0 then
  return {0, remaining_before, reset_before, worst_wait, worst - 1}
end
for i = 1, #KEYS do
  -- The key expires when its bucket is full again: a missing key means a full bucket.
  redis.call('SET', KEYS[i], string.format('%.0f', tats[i]),
    'PXAT', string.format('%.0f', math.ceil(tats[i] / 1000)))
end
return {1, remaining, reset_after, next_after}
"""

_REDIS_ERRORS: Final = (RedisError, RedisClusterException, OSError)


def bucket_key(group: str, bucket: str) -> str:
    """The Redis key of ``bucket``; ``{group}`` is the hash tag keeping a decision on one slot."""
    # An empty tag would hash each whole key on its own, scattering one decision's keys.
    return f"gw:rl:{{{group or '_'}}}:{bucket}"


def _interval_us(limit: Limit) -> int:
    # Rounded up, so that rounding can never admit more than per_minute a minute.
    return -(-_MINUTE_US // limit.per_minute)


class RedisLimiter:
    """GCRA buckets in Redis (single node or Cluster); one ``EVALSHA`` per decision.

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

    async def check(self, limits: Sequence[Limit], group: str) -> Decision:
        keys = [bucket_key(group, limit.bucket) for limit in limits]
        args: list[int] = []
        for limit in limits:
            interval = _interval_us(limit)
            args += (interval, interval * limit.burst)
        try:
            reply = await self._script(keys, args)
        except _REDIS_ERRORS as exc:
            raise LimiterUnavailable(f"Redis: {exc}") from exc
        own = limits[0].per_minute
        if reply[0]:
            return Decision(True, own, reply[1], reply[2] / _US, reply[3] / _US)
        wait: float = reply[3] / _US
        return Decision(
            False,
            own,
            reply[1],
            reply[2] / _US,
            wait,
            retry_after=wait,
            rejected_limit=limits[reply[4]].per_minute,
        )

    async def close(self) -> None:
        await self._client.aclose()
