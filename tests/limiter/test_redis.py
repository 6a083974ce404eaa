"""The Redis limiter against real servers: the same GCRA semantics as the in-process one.

Redis ``TIME`` is the clock and cannot be set, so where time passes between
calls the checks allow for it: ceilings (what the contract fixes) stay exact,
fractional seconds get a tolerance. To start from a given state the tests write
TATs into Redis relative to its own clock.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid

import pytest
import redis.asyncio
from redis.asyncio.cluster import RedisCluster

from gateway.config import LimiterSettings
from gateway.limiter import Limit, LimiterUnavailable, decide
from gateway.limiter.fallback import FallbackLimiter
from gateway.limiter.redis import RedisLimiter, bucket_key
from tests import services
from tests.limiter.conftest import NewGroup

US = 1_000_000
# What a few loopback round trips may take on a busy CI machine.
SLACK = 0.25


def limit(per_minute: int, burst: int | None = None, bucket: str = "k") -> Limit:
    return Limit(bucket, per_minute, burst or per_minute)


async def redis_now_us(client: redis.asyncio.Redis) -> int:
    seconds, micros = await client.time()
    return seconds * US + micros


async def stored_tat(client: redis.asyncio.Redis, group: str, bucket: str) -> int | None:
    value = await client.get(bucket_key(group, bucket))
    return None if value is None else int(value)


# -- the semantics of tests/limiter/test_gcra.py ----------------------------------------


async def test_fresh_60_per_minute_key_sends_60_at_once_then_one_per_second(
    redis_limiter: RedisLimiter, group: str
) -> None:
    decisions = [await redis_limiter.check([limit(60)], group) for _ in range(60)]
    assert all(d.allowed for d in decisions)
    assert [d.remaining for d in decisions[:3]] == [59, 58, 57]
    assert decisions[-1].remaining == 0
    refused = await redis_limiter.check([limit(60)], group)
    assert not refused.allowed
    assert math.ceil(refused.retry_after) == 1
    assert refused.rejected_limit == 60 and refused.limit == 60 and refused.remaining == 0
    await asyncio.sleep(refused.retry_after + 0.02)
    assert (await redis_limiter.check([limit(60)], group)).allowed
    again = await redis_limiter.check([limit(60)], group)
    assert not again.allowed
    assert 1.0 - SLACK < again.retry_after <= 1.0
    assert math.ceil(again.retry_after) == 1


async def test_one_per_minute_key_waits_sixty_seconds(
    redis_limiter: RedisLimiter, redis_client: redis.asyncio.Redis, group: str
) -> None:
    assert (await redis_limiter.check([limit(1)], group)).allowed
    refused = await redis_limiter.check([limit(1)], group)
    assert not refused.allowed
    assert math.ceil(refused.retry_after) == 60 and refused.rejected_limit == 1
    # As if the one request had been spent 30 s ago.
    now = await redis_now_us(redis_client)
    await redis_client.set(bucket_key(group, "k"), now + 30 * US, px=60_000)
    later = await redis_limiter.check([limit(1)], group)
    assert not later.allowed and math.ceil(later.retry_after) == 30


async def test_reset_is_time_until_the_bucket_is_full(
    redis_limiter: RedisLimiter, group: str
) -> None:
    for _ in range(10):
        d = await redis_limiter.check([limit(60)], group)
    assert d.remaining == 50
    assert 10.0 - SLACK < d.reset_after <= 10.0
    assert d.next_after == 0.0  # 50 left: the next request is admitted now


async def test_refusal_charges_nothing(
    redis_limiter: RedisLimiter, redis_client: redis.asyncio.Redis, group: str
) -> None:
    assert (await redis_limiter.check([limit(1)], group)).allowed
    tat = await stored_tat(redis_client, group, "k")
    waits = []
    for _ in range(100):
        refused = await redis_limiter.check([limit(1)], group)
        assert not refused.allowed
        waits.append(refused.retry_after)
    assert await stored_tat(redis_client, group, "k") == tat
    assert waits == sorted(waits, reverse=True)  # the wait only shrinks as time passes


async def test_all_or_nothing_across_key_and_team(
    redis_limiter: RedisLimiter, redis_client: redis.asyncio.Redis, group: str
) -> None:
    key_a = limit(10, bucket="k:a")
    key_b = limit(10, bucket="k:b")
    team = limit(3, bucket="t:1")
    assert (await redis_limiter.check([key_a, team], group)).allowed
    assert (await redis_limiter.check([key_b, team], group)).allowed
    assert (await redis_limiter.check([key_a, team], group)).allowed
    before = await stored_tat(redis_client, group, "k:b")
    refused = await redis_limiter.check([key_b, team], group)
    assert not refused.allowed
    assert refused.rejected_limit == 3 and math.ceil(refused.retry_after) == 20
    # The refusal reports key b's own bucket as it stands: 9 of 10 left.
    assert refused.limit == 10 and refused.remaining == 9
    # The team refused it, so key b's own bucket was not charged.
    assert await stored_tat(redis_client, group, "k:b") == before
    assert (await redis_limiter.check([key_b], group)).remaining == 8


async def test_retry_after_is_the_longest_wait_among_rejecting_limits(
    redis_limiter: RedisLimiter, group: str
) -> None:
    fast = limit(60, bucket="k")
    slow = limit(1, bucket="t")
    assert (await redis_limiter.check([fast, slow], group)).allowed
    refused = await redis_limiter.check([fast, slow], group)
    assert math.ceil(refused.retry_after) == 60 and refused.rejected_limit == 1


# -- the script is decide() ---------------------------------------------------------------

# Each bucket's TAT as a whole number of its intervals from now (None: no key).
# Whole intervals keep every integer result stable while a few ms pass between
# reading Redis' clock and the script reading it again.
STATES: list[tuple[list[Limit], list[int | None]]] = [
    ([limit(60)], [None]),
    ([limit(60)], [-5]),  # a TAT in the past is a full bucket
    ([limit(60)], [10]),
    ([limit(60)], [59]),  # the last request of the burst
    ([limit(60)], [60]),  # burst spent
    ([limit(60, burst=10)], [9]),
    ([limit(60, burst=10)], [10]),
    ([limit(6)], [3]),
    ([limit(10, bucket="k"), limit(3, bucket="t")], [2, 3]),  # the team refuses
    ([limit(10, bucket="k"), limit(3, bucket="t")], [10, 2]),  # the key refuses
    ([limit(10, bucket="k"), limit(3, bucket="t")], [10, 3]),  # both; the team waits longer
    ([limit(1, bucket="k"), limit(60, bucket="t")], [1, 60]),  # both; the key waits longer
    ([limit(60, bucket="k"), limit(30, bucket="t")], [None, 29]),
    ([limit(60, bucket="k"), limit(30, bucket="t")], [59, 29]),
    ([limit(60, bucket="k"), limit(30, bucket="t")], [30, 5]),
    ([limit(60, bucket="k"), limit(100, bucket="t")], [None, 98]),  # the team has less room
]


@pytest.mark.parametrize(("limits", "offsets"), STATES)
async def test_the_script_decides_as_decide_does(
    redis_limiter: RedisLimiter,
    redis_client: redis.asyncio.Redis,
    group: str,
    limits: list[Limit],
    offsets: list[int | None],
) -> None:
    now = await redis_now_us(redis_client)
    seeded: list[int | None] = []
    for lim, offset in zip(limits, offsets, strict=True):
        tat = None if offset is None else now + offset * 60 * US // lim.per_minute
        if tat is not None:
            await redis_client.set(bucket_key(group, lim.bucket), tat, px=300_000)
        seeded.append(tat)
    # Decided on times relative to Redis' clock: seconds since the epoch as
    # floats lose the last digits that whole-interval boundaries depend on.
    expected, new_tats = decide(
        limits, [None if t is None else (t - now) / US for t in seeded], 0.0
    )

    got = await redis_limiter.check(limits, group)

    assert (got.allowed, got.limit, got.remaining, got.rejected_limit, got.room) == (
        expected.allowed,
        expected.limit,
        expected.remaining,
        expected.rejected_limit,
        expected.room,
    )
    assert math.ceil(got.retry_after) == math.ceil(expected.retry_after)
    for field in ("reset_after", "next_after", "retry_after"):
        assert getattr(got, field) == pytest.approx(getattr(expected, field), abs=SLACK)
    for lim, tat, new_tat in zip(limits, seeded, new_tats, strict=True):
        stored = await stored_tat(redis_client, group, lim.bucket)
        if not expected.allowed:
            assert stored == tat  # nothing charged, not even a key created
        else:
            assert stored is not None
            assert (stored - now) / US == pytest.approx(new_tat, abs=SLACK)


async def test_keys_carry_the_group_tag_and_expire_when_the_bucket_is_full(
    redis_limiter: RedisLimiter, redis_client: redis.asyncio.Redis, group: str
) -> None:
    for _ in range(10):
        await redis_limiter.check([limit(60, bucket="k:a"), limit(1, bucket="t:1")], group)
        await redis_limiter.check([limit(60, bucket="k:b")], group)
    assert sorted(await redis_client.keys(bucket_key(group, "*"))) == [
        f"gw:rl:{{{group}}}:k:a".encode(),
        f"gw:rl:{{{group}}}:k:b".encode(),
        f"gw:rl:{{{group}}}:t:1".encode(),
    ]
    # k:b took 10 of 60/min: full again in 10 s. The team key refused all but the first.
    assert 10_000 - SLACK * 1000 < await redis_client.pttl(bucket_key(group, "k:b")) <= 10_000
    assert 60_000 - SLACK * 1000 < await redis_client.pttl(bucket_key(group, "t:1")) <= 60_000
    assert 1_000 - SLACK * 1000 < await redis_client.pttl(bucket_key(group, "k:a")) <= 1_000
    # TATs are whole microseconds, written out in full.
    raw = await redis_client.get(bucket_key(group, "k:b"))
    assert raw is not None and raw.isdigit()


async def test_200_concurrent_checks_of_a_60_per_minute_key_admit_exactly_60(
    redis_limiter: RedisLimiter, group: str
) -> None:
    decisions = await asyncio.gather(*(redis_limiter.check([limit(60)], group) for _ in range(200)))
    assert sum(d.allowed for d in decisions) == 60
    assert sorted(d.remaining for d in decisions if d.allowed) == list(range(60))


async def test_cancelled_checks_leave_no_stale_reply_behind(
    redis_limiter: RedisLimiter, group: str
) -> None:
    # A check cut off mid-flight (the fallback's timeout does that) must not leave
    # its reply on a pooled connection, where the next check would read it.
    storm = [limit(1_000_000, bucket="storm")]
    assert (await redis_limiter.check(storm, group)).allowed  # a pooled connection to reuse
    outcomes = {"answered": 0, "cut": 0}
    for i in range(200):
        try:
            await asyncio.wait_for(redis_limiter.check(storm, group), (i % 40) * 0.0001)
            outcomes["answered"] += 1
        except TimeoutError:
            outcomes["cut"] += 1
    assert outcomes["answered"] and outcomes["cut"]
    answers = [await redis_limiter.check([limit(3, bucket="after")], group) for _ in range(4)]
    assert [(d.allowed, d.limit, d.remaining) for d in answers] == [
        (True, 3, 2),
        (True, 3, 1),
        (True, 3, 0),
        (False, 3, 0),
    ]


# -- the script on the server: EVALSHA, NOSCRIPT, Cluster ---------------------------------


async def evalsha_counts(admin: redis.asyncio.Redis) -> dict[str, int]:
    stats = await admin.info("commandstats")
    assert "cmdstat_eval" not in stats  # never the whole script text
    evalsha = stats["cmdstat_evalsha"]
    return {
        "decisions": evalsha["calls"] - evalsha["failed_calls"],
        "noscript": evalsha["failed_calls"],
        "loads": stats["cmdstat_script|load"]["calls"],
    }


async def test_one_evalsha_per_decision_and_recovery_from_script_flush(
    redis_server: services.RedisServer,
) -> None:
    # A server of its own: SCRIPT FLUSH and the command counters are server-wide.
    limiter = RedisLimiter(LimiterSettings(url=redis_server.url, timeout_seconds=2.0))
    admin = redis.asyncio.from_url(redis_server.url)
    try:
        await admin.config_resetstat()
        for _ in range(3):
            assert (await limiter.check([limit(60)], "g")).allowed
        # A new server has never seen the script: one NOSCRIPT, one SCRIPT LOAD.
        assert await evalsha_counts(admin) == {"decisions": 3, "noscript": 1, "loads": 1}

        assert await admin.script_flush()
        d = await limiter.check([limit(60)], "g")
        assert d.allowed and d.remaining == 56  # the buckets survived, only the script went
        assert (await limiter.check([limit(60)], "g")).remaining == 55
        assert await evalsha_counts(admin) == {"decisions": 5, "noscript": 2, "loads": 2}
    finally:
        await admin.aclose()
        await limiter.close()


async def test_concurrent_decisions_share_calls_and_decide_as_one_at_a_time(
    redis_server: services.RedisServer,
) -> None:
    limiter = RedisLimiter(LimiterSettings(url=redis_server.url, timeout_seconds=2.0))
    admin = redis.asyncio.from_url(redis_server.url)
    try:
        await admin.config_resetstat()
        # 100 at once on one 60/min bucket, mixed with a key and team pair whose
        # team allows 3: batched, each decision still sees those before it.
        own = [limiter.check([limit(60)], "g") for _ in range(100)]
        paired = [limiter.check([limit(10, bucket=f"k:{i % 2}"), limit(3, bucket="t")], "g")
                  for i in range(10)]
        decisions = await asyncio.gather(*own, *paired)
        solo, pairs = decisions[:100], decisions[100:]
        assert sum(d.allowed for d in solo) == 60
        assert sorted(d.remaining for d in solo if d.allowed) == list(range(60))
        assert all(math.ceil(d.retry_after) == 1 for d in solo if not d.allowed)
        assert sum(d.allowed for d in pairs) == 3
        assert {d.rejected_limit for d in pairs if not d.allowed} == {3}
        # A refusal charged neither bucket: 3 admitted requests are all key 0 and 1 took.
        taken = [await stored_tat(admin, "g", f"k:{i}") for i in range(2)]
        now = await redis_now_us(admin)
        interval = -(-60 * US // 10)
        assert sum(round((t - now) / interval) for t in taken if t is not None) == 3
        calls = (await admin.info("commandstats"))["cmdstat_evalsha"]
        assert calls["calls"] - calls["failed_calls"] < 110 / 10  # far fewer calls than decisions
    finally:
        await admin.aclose()
        await limiter.close()


async def test_on_a_cluster_a_batch_never_spans_two_groups(
    redis_cluster: services.RedisCluster,
) -> None:
    settings = LimiterSettings(url=redis_cluster.url, cluster=True, timeout_seconds=2.0)
    limiter = RedisLimiter(settings)
    try:
        # As the gateway does at start: the script is loaded on every node first.
        # (redis-py's cluster client, racing NOSCRIPT recoveries on fresh nodes,
        # loses connections now and then, batched or not.)
        assert (await limiter.check([limit(5, bucket="warm-up")], "warm-up")).allowed
        groups = [uuid.uuid4().hex for _ in range(12)]  # spread over the three nodes
        checks = [limiter.check([limit(5, bucket="k"), limit(100, bucket="t")], g)
                  for g in groups for _ in range(8)]
        decisions = await asyncio.gather(*checks)  # a CROSSSLOT refusal would raise here
        for i in range(len(groups)):
            mine = decisions[i * 8 : (i + 1) * 8]
            assert [d.allowed for d in mine] == [True] * 5 + [False] * 3
        assert limiter._batchers == {}  # quiet groups leave nothing behind
    finally:
        await limiter.close()


async def test_on_a_three_node_cluster(redis_cluster: services.RedisCluster) -> None:
    settings = LimiterSettings(url=redis_cluster.url, cluster=True, timeout_seconds=2.0)
    limiter = RedisLimiter(settings)
    inspect = RedisCluster.from_url(redis_cluster.url)
    try:
        await inspect.initialize()
        # One group per node, so that the script really runs on all three.
        by_node: dict[str, str] = {}
        while len(by_node) < len(redis_cluster.nodes):
            candidate = uuid.uuid4().hex
            node = inspect.get_node_from_key(bucket_key(candidate, "k:a"))
            by_node.setdefault(node.name, candidate)
        for group in by_node.values():
            key_a, key_b, team = (
                limit(10, bucket="k:a"),
                limit(10, bucket="k:b"),
                limit(3, bucket="t"),
            )
            assert (await limiter.check([key_a, team], group)).allowed
            assert (await limiter.check([key_b, team], group)).allowed
            assert (await limiter.check([key_a, team], group)).allowed
            refused = await limiter.check([key_b, team], group)
            assert not refused.allowed
            assert refused.rejected_limit == 3 and math.ceil(refused.retry_after) == 20
            assert (await limiter.check([key_b], group)).remaining == 8
            slots = {
                await inspect.cluster_keyslot(bucket_key(group, b)) for b in ("k:a", "k:b", "t")
            }
            assert len(slots) == 1
        nodes = [redis.asyncio.from_url(server.url) for server in redis_cluster.nodes]
        try:
            for node_client in nodes:
                assert await node_client.dbsize() >= 3

            # Without a group the keys still share a slot (no CROSSSLOT refusal).
            anonymous = [limit(10, bucket=f"k:{uuid.uuid4().hex}"), limit(3, bucket="t:none")]
            assert (await limiter.check(anonymous, "")).allowed

            before = [await evalsha_counts(node_client) for node_client in nodes]
            for node_client in nodes:
                assert await node_client.script_flush()
            for group in by_node.values():
                assert (await limiter.check([limit(10, bucket="k:a")], group)).remaining == 7
            after = [await evalsha_counts(node_client) for node_client in nodes]
            # The first node asked answered NOSCRIPT; the reload went to every node.
            assert sum(n["noscript"] for n in after) == sum(n["noscript"] for n in before) + 1
            for old, new in zip(before, after, strict=True):
                assert new["loads"] == old["loads"] + 1
                assert new["decisions"] == old["decisions"] + 1
        finally:
            for node_client in nodes:
                await node_client.aclose()
    finally:
        await inspect.aclose()
        await limiter.close()


# -- when Redis is away -----------------------------------------------------------------


async def test_an_unreachable_redis_raises_limiter_unavailable_at_once() -> None:
    limiter = RedisLimiter(LimiterSettings(url=f"redis://127.0.0.1:{services.free_port()}/0"))
    try:
        started = time.monotonic()
        with pytest.raises(LimiterUnavailable):
            await limiter.check([limit(60)], "g")
        assert time.monotonic() - started < 1.0
    finally:
        await limiter.close()


async def test_fallback_while_redis_is_down_and_recovery_when_it_returns(
    redis_server: services.RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.limiter")
    settings = LimiterSettings(url=redis_server.url, timeout_seconds=0.5)
    limiter = FallbackLimiter(RedisLimiter(settings), settings)
    one = [limit(1)]
    try:
        assert (await limiter.check(one, "g")).allowed
        refused = await limiter.check(one, "g")
        assert not refused.allowed  # Redis remembers
        assert not limiter.degraded and limiter.failures == 0

        redis_server.stop()
        # The in-process limiter takes over, starting empty, and enforces the limit.
        assert (await limiter.check(one, "g")).allowed
        assert limiter.degraded and limiter.failures == 1
        refused = await limiter.check(one, "g")
        assert not refused.allowed and math.ceil(refused.retry_after) == 60
        for _ in range(50):
            assert not (await limiter.check(one, "g")).allowed
        assert limiter.fallback_decisions == 52

        redis_server.start()
        back_at = time.monotonic()
        while limiter.degraded:
            assert time.monotonic() - back_at < 2.0, "no recovery within 2 s of Redis returning"
            await limiter.check(one, "g")
            await asyncio.sleep(0.05)
        # Redis decides again: the restarted server has an empty bucket for the key.
        counted = limiter.fallback_decisions
        assert not (await limiter.check(one, "g")).allowed
        assert limiter.fallback_decisions == counted and not limiter.degraded
    finally:
        await limiter.close()

    records = [r for r in caplog.records if r.name == "gateway.limiter"]
    assert [r.levelno for r in records] == [logging.WARNING, logging.INFO]
    assert all(r.exc_info is None for r in records)


async def test_a_redis_that_does_not_answer_costs_at_most_the_timeout(
    redis_server: services.RedisServer,
) -> None:
    settings = LimiterSettings(url=redis_server.url, timeout_seconds=0.1)
    limiter = FallbackLimiter(RedisLimiter(settings), settings)
    admin = redis.asyncio.from_url(redis_server.url)
    try:
        assert (await limiter.check([limit(60)], "g")).allowed
        await admin.execute_command("CLIENT", "PAUSE", 1000, "ALL")
        started = time.monotonic()
        decision = await limiter.check([limit(60)], "g")
        assert time.monotonic() - started < 0.1 + SLACK
        assert decision.allowed and limiter.degraded and limiter.fallback_decisions == 1
        back_at = time.monotonic()
        while limiter.degraded:
            assert time.monotonic() - back_at < 3.0
            await limiter.check([limit(60)], "g")
            await asyncio.sleep(0.05)
        counted = limiter.fallback_decisions
        assert (await limiter.check([limit(60)], "g")).allowed
        assert limiter.fallback_decisions == counted
    finally:
        await admin.aclose()
        await limiter.close()


async def test_fail_closed_raises_limiter_unavailable() -> None:
    settings = LimiterSettings(
        url=f"redis://127.0.0.1:{services.free_port()}/0", on_unavailable="fail_closed"
    )
    limiter = FallbackLimiter(RedisLimiter(settings), settings)
    try:
        for _ in range(3):  # the first reaches for Redis, the others do not wait for it
            with pytest.raises(LimiterUnavailable):
                await limiter.check([limit(60)], "g")
        assert limiter.degraded and limiter.failures == 1 and limiter.fallback_decisions == 0
    finally:
        await limiter.close()


async def test_fail_open_allows_and_reports_the_full_limit() -> None:
    settings = LimiterSettings(
        url=f"redis://127.0.0.1:{services.free_port()}/0", on_unavailable="fail_open"
    )
    limiter = FallbackLimiter(RedisLimiter(settings), settings)
    try:
        for _ in range(100):
            d = await limiter.check([limit(60, burst=100), limit(1, bucket="t")], "g")
            assert d.allowed and d.limit == 60 and d.remaining == 100
            assert d.reset_after == 0.0 and d.next_after == 0.0
        assert limiter.degraded and limiter.fallback_decisions == 100
    finally:
        await limiter.close()


async def test_a_healthy_primary_is_passed_through(redis_url: str, new_group: NewGroup) -> None:
    settings = LimiterSettings(url=redis_url, timeout_seconds=2.0)
    limiter = FallbackLimiter(RedisLimiter(settings), settings)
    group = new_group()
    try:
        decisions = [await limiter.check([limit(3)], group) for _ in range(4)]
        assert [d.allowed for d in decisions] == [True, True, True, False]
        assert not limiter.degraded
        assert (limiter.failures, limiter.fallback_decisions) == (0, 0)
    finally:
        await limiter.close()
