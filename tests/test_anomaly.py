"""Anomaly signals: an injected spike raises them, steady traffic does not."""

from __future__ import annotations

from gateway.anomaly import AnomalyDetector
from gateway.config import AnomalySettings
from gateway.metrics import Metrics


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def detector(**overrides: float) -> tuple[AnomalyDetector, Clock, Metrics]:
    clock = Clock()
    metrics = Metrics()
    settings = AnomalySettings(**overrides)  # type: ignore[arg-type]
    return AnomalyDetector(settings, metrics, clock=clock), clock, metrics


def minute(
    d: AnomalyDetector, clock: Clock, requests: int, key: str = "key_a", ips: int = 1
) -> None:
    for i in range(requests):
        d.request(key, "team_1", f"10.0.0.{i % ips}")
    clock.now += 60
    d.tick()


def kinds(d: AnomalyDetector) -> list[str]:
    return [a.kind for a in d.recent]


def test_steady_traffic_raises_nothing() -> None:
    d, clock, _ = detector()
    for _ in range(60):
        minute(d, clock, 100)
    assert kinds(d) == []


def test_a_spike_over_the_keys_own_rate_is_flagged() -> None:
    d, clock, metrics = detector()
    for _ in range(30):
        minute(d, clock, 20)
    minute(d, clock, 500)
    assert kinds(d) == ["rate_spike"]
    spike = d.recent[0]
    assert spike.subject == "key_a" and spike.team_id == "team_1" and spike.observed == 500
    assert metrics.anomalies.labels("rate_spike")._value.get() == 1


def test_a_busy_but_usual_key_is_not_flagged() -> None:
    d, clock, _ = detector()
    for _ in range(30):
        minute(d, clock, 1000)
    minute(d, clock, 1500)  # 1.5x its usual rate: busy, not anomalous
    assert kinds(d) == []


def test_small_absolute_numbers_are_not_flagged() -> None:
    d, clock, _ = detector()
    for _ in range(30):
        minute(d, clock, 1)
    minute(d, clock, 30)  # 30x, but under rate_spike_min_requests
    assert kinds(d) == []


def test_many_new_client_addresses() -> None:
    d, clock, _ = detector()
    minute(d, clock, 10, ips=2)  # the first window learns the usual addresses
    for _ in range(5):
        minute(d, clock, 10, ips=2)
    assert kinds(d) == []
    for i in range(25):
        d.request("key_a", "team_1", f"192.0.2.{i}")
    clock.now += 60
    d.tick()
    assert kinds(d) == ["new_ips"]


def test_auth_failure_burst_by_prefix_and_by_address() -> None:
    d, clock, _ = detector(auth_failure_threshold=20)
    for _ in range(10):
        d.auth_failure("ckiq_live_AbCd", "198.51.100.7")
    clock.now += 60
    d.tick()
    assert kinds(d) == []
    for _ in range(25):
        d.auth_failure("ckiq_live_AbCd", "198.51.100.7")
    clock.now += 60
    d.tick()
    subjects = sorted(a.subject for a in d.recent)
    assert subjects == ["198.51.100.7", "ckiq_live_AbCd"]
    assert kinds(d) == ["auth_failures", "auth_failures"]


def test_idle_minutes_lower_the_baseline() -> None:
    d, clock, _ = detector()
    for _ in range(10):
        minute(d, clock, 200)
    clock.now += 60 * 60  # an hour of silence
    d.tick()
    minute(d, clock, 400)
    assert kinds(d) == ["rate_spike"]


def test_new_addresses_of_a_single_address_key_are_counted_exactly() -> None:
    # A key used from one address keeps that address without a table of its
    # own; a second address, or the first after it was forgotten, is new.
    d, clock, _ = detector(new_ips_threshold=2, new_ip_memory_seconds=600)
    minute(d, clock, 5)  # learns 10.0.0.0
    minute(d, clock, 5)  # the same address: nothing new
    assert kinds(d) == []
    d.request("key_a", "team_1", "10.0.0.0")
    d.request("key_a", "team_1", "192.0.2.1")  # 1 new
    clock.now += 60
    d.tick()
    assert kinds(d) == []  # 1 < 2
    clock.now += 900  # both addresses forgotten (idle minutes close on the next tick)
    d.request("key_a", "team_1", "10.0.0.0")
    d.request("key_a", "team_1", "192.0.2.1")
    clock.now += 60
    d.tick()
    assert kinds(d) == ["new_ips"]
    assert d.recent[0].observed == 2


def test_a_single_address_key_seen_again_after_the_memory_is_new() -> None:
    d, clock, _ = detector(new_ips_threshold=1, new_ip_memory_seconds=600)
    minute(d, clock, 3)
    clock.now += 900
    d.tick()
    d.request("key_a", "team_1", "10.0.0.0")
    clock.now += 60
    d.tick()
    assert kinds(d) == ["new_ips"]


def test_a_key_idle_for_a_day_is_forgotten_and_its_row_starts_clean() -> None:
    d, clock, _ = detector()
    for _ in range(5):
        minute(d, clock, 10, key="key_old", ips=3)  # a baseline and three addresses
    clock.now += 86400 + 60
    d.tick()  # key_old has been idle for over a day: dropped
    # A new key takes the freed row. Its first window only learns, whatever the
    # row held before: no baseline, no remembered addresses, nothing raised.
    for i in range(25):
        d.request("key_new", "team_2", f"192.0.2.{i}")
    clock.now += 60
    d.tick()
    assert kinds(d) == []
    # From its second window on it is judged like any key: 25 new addresses.
    for i in range(25):
        d.request("key_new", "team_2", f"198.51.100.{i}")
    clock.now += 60
    d.tick()
    assert kinds(d) == ["new_ips"]
    assert d.recent[0].subject == "key_new" and d.recent[0].team_id == "team_2"
    # key_old comes back as a stranger: its first window learns again.
    for i in range(25):
        d.request("key_old", "team_1", f"203.0.113.{i}")
    clock.now += 60
    d.tick()
    assert kinds(d) == ["new_ips"]
