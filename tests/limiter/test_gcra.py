import math

from gateway.limiter import Limit
from gateway.limiter.memory import MemoryLimiter


def limit(per_minute: int, burst: int | None = None, bucket: str = "k") -> Limit:
    return Limit(bucket, per_minute, burst or per_minute)


def test_fresh_60_per_minute_key_sends_60_at_once_then_one_per_second() -> None:
    lim = MemoryLimiter()
    now = 1000.0
    decisions = [lim.check_now([limit(60)], now) for _ in range(60)]
    assert all(d.allowed for d in decisions)
    assert [d.remaining for d in decisions[:3]] == [59, 58, 57]
    assert decisions[-1].remaining == 0
    refused = lim.check_now([limit(60)], now)
    assert not refused.allowed
    assert math.ceil(refused.retry_after) == 1
    assert refused.rejected_limit == 60
    assert lim.check_now([limit(60)], now + 0.999).allowed is False
    assert lim.check_now([limit(60)], now + 1.0).allowed is True
    assert lim.check_now([limit(60)], now + 1.0).allowed is False


def test_one_per_minute_key_waits_sixty_seconds() -> None:
    lim = MemoryLimiter()
    assert lim.check_now([limit(1)], 0.0).allowed
    refused = lim.check_now([limit(1)], 0.0)
    assert not refused.allowed and math.ceil(refused.retry_after) == 60
    later = lim.check_now([limit(1)], 30.0)
    assert math.ceil(later.retry_after) == 30


def test_reset_is_time_until_the_bucket_is_full() -> None:
    lim = MemoryLimiter()
    for _ in range(10):
        d = lim.check_now([limit(60)], 0.0)
    assert d.reset_after == 10.0
    assert d.next_after == 0.0  # 50 left: the next request is admitted now


def test_refusal_charges_nothing() -> None:
    lim = MemoryLimiter()
    assert lim.check_now([limit(1)], 0.0).allowed
    for _ in range(100):
        assert not lim.check_now([limit(1)], 1.0).allowed
    assert lim.check_now([limit(1)], 60.0).allowed


def test_all_or_nothing_across_key_and_team() -> None:
    lim = MemoryLimiter()
    key_a = limit(10, bucket="k:a")
    key_b = limit(10, bucket="k:b")
    team = limit(3, bucket="t:1")
    assert lim.check_now([key_a, team], 0.0).allowed
    assert lim.check_now([key_b, team], 0.0).allowed
    assert lim.check_now([key_a, team], 0.0).allowed
    refused = lim.check_now([key_b, team], 0.0)
    assert not refused.allowed
    assert refused.rejected_limit == 3 and math.ceil(refused.retry_after) == 20
    # The team refused it, so key b's own bucket was not charged: 9 of 10 left.
    assert lim.check_now([key_b], 0.0).remaining == 8


def test_retry_after_is_the_longest_wait_among_rejecting_limits() -> None:
    lim = MemoryLimiter()
    fast = limit(60, bucket="k")
    slow = limit(1, bucket="t")
    assert lim.check_now([fast, slow], 0.0).allowed
    refused = lim.check_now([fast, slow], 0.0)
    assert math.ceil(refused.retry_after) == 60 and refused.rejected_limit == 1


def test_full_buckets_are_forgotten() -> None:
    lim = MemoryLimiter()
    for i in range(5000):
        lim.check_now([limit(60, bucket=f"k{i}")], 0.0)
    lim.check_now([limit(60, bucket="late")], 100.0)
    for _ in range(4096):
        lim.check_now([limit(60, bucket="late")], 100.0 + _)
    assert len(lim) < 5000
