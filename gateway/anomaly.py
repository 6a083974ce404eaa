"""Anomaly signals computed by the gateway from the traffic it sees.

Three signals, each over fixed windows of ``window_seconds`` (default one minute):

- ``rate_spike``: a key sent more than ``rate_spike_factor`` times its own recent
  rate (an exponentially weighted mean over the last ``baseline_windows``
  windows) and at least ``rate_spike_min_requests`` in one window;
- ``new_ips``: a key was used from at least ``new_ips_threshold`` client
  addresses it had not used in the last ``new_ip_memory_seconds``, in one window;
- ``auth_failures``: at least ``auth_failure_threshold`` refused credentials
  in one window for one key prefix, or from one client address.

Each replica judges the traffic it serves; the signals are counted in the
``gateway_anomalies_total`` metric, kept (bounded) for the admin API and the
console, and logged. Memory is bounded: per-key state is dropped for keys idle
for a day, remembered addresses are capped per key.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from array import array
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from gateway.config import AnomalySettings
from gateway.metrics import Metrics

__all__ = ["Anomaly", "AnomalyDetector"]

log = logging.getLogger("gateway.anomaly")
_MAX_IPS_PER_KEY = 1000
_MAX_RECENT = 500
_IDLE_SECONDS = 86400.0
# Distinct prefixes or addresses counted per window; past this an attack is
# obvious anyway, and memory stays bounded.
_MAX_FAILURE_SUBJECTS = 100_000
_NO_BASELINE = math.nan


@dataclass(frozen=True, slots=True)
class Anomaly:
    kind: str  # rate_spike | new_ips | auth_failures
    at: float
    subject: str  # what it is about: a key id, a key prefix or a client address
    team_id: str | None
    observed: float
    threshold: float
    detail: str


class _KeyTable:
    """Every key's state, one row per key across parallel arrays.

    An object per key cost about 200 bytes (object, two floats, dict growth);
    a row here is two floats in arrays, four list slots and the id's dict entry.
    Rows of keys dropped for idleness are reused.
    """

    __slots__ = (
        "baseline",
        "count",
        "free",
        "ip",
        "last_seen",
        "new_ips",
        "rows",
        "team",
    )

    def __init__(self) -> None:
        self.rows: dict[str, int] = {}  # key id -> row
        self.team: list[str] = []
        # The addresses seen and when. Most keys are used from one address, and a
        # dict per key would cost more than the rest of the row: the first address
        # is kept as a string (seen at ``last_seen``), a dict only from the second.
        self.ip: list[str | dict[str, float] | None] = []
        # Lists rather than arrays: a window's counts are mostly ints under 257,
        # which Python shares, so a slot costs the same 8 bytes and is faster.
        self.count: list[int] = []
        self.new_ips: list[int] = []
        self.baseline = array("d")  # NaN until the key's first window closes
        self.last_seen = array("d")
        self.free: list[int] = []

    def add(self, key_id: str, team_id: str) -> int:
        if self.free:
            row = self.free.pop()
            self.team[row] = team_id
            self.count[row] = 0
            self.new_ips[row] = 0
            self.baseline[row] = _NO_BASELINE
            self.last_seen[row] = 0.0
        else:
            row = len(self.team)
            self.team.append(team_id)
            self.ip.append(None)
            self.count.append(0)
            self.new_ips.append(0)
            self.baseline.append(_NO_BASELINE)
            self.last_seen.append(0.0)
        self.rows[key_id] = row
        return row

    def drop(self, key_id: str) -> None:
        row = self.rows.pop(key_id)
        self.ip[row] = None
        self.free.append(row)


class AnomalyDetector:
    def __init__(
        self,
        settings: AnomalySettings,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._clock = clock
        self._window = self._window_of(clock())
        self._keys = _KeyTable()
        self._failures_by_prefix: dict[str, int] = {}
        self._failures_by_ip: dict[str, int] = {}
        self.recent: deque[Anomaly] = deque(maxlen=_MAX_RECENT)
        # Told of every signal raised (the webhook worker, which makes it an event).
        self.on_raise: Callable[[Anomaly], None] | None = None
        self._alpha = 2.0 / (settings.baseline_windows + 1)

    def _window_of(self, now: float) -> int:
        return int(now // self._settings.window_seconds)

    def _roll(self, now: float) -> None:
        window = self._window_of(now)
        if window == self._window:
            return
        self._close_window(now)
        # Windows with no traffic at all also count towards the baselines.
        rows = self._keys.rows.values()
        for _ in range(min(window - self._window - 1, self._settings.baseline_windows)):
            for row in rows:
                self._update_baseline(row, 0)
        self._window = window

    def _update_baseline(self, row: int, count: int) -> None:
        baselines = self._keys.baseline
        baseline = baselines[row]
        if math.isnan(baseline):
            baselines[row] = float(count)
        else:
            baselines[row] = baseline + self._alpha * (count - baseline)

    def _close_window(self, now: float) -> None:
        s = self._settings
        table = self._keys
        counts, new_ips, baselines = table.count, table.new_ips, table.baseline
        idle: list[str] = []
        for key_id, row in table.rows.items():
            count = counts[row]
            baseline = baselines[row]
            if not math.isnan(baseline):
                limit = max(s.rate_spike_min_requests, s.rate_spike_factor * baseline)
                if count >= limit:
                    self._raise(
                        Anomaly(
                            "rate_spike",
                            now,
                            key_id,
                            table.team[row],
                            count,
                            limit,
                            f"{count} requests in {s.window_seconds:g} s against a recent "
                            f"mean of {baseline:.1f}",
                        )
                    )
            fresh = new_ips[row]
            if fresh >= s.new_ips_threshold:
                self._raise(
                    Anomaly(
                        "new_ips",
                        now,
                        key_id,
                        table.team[row],
                        fresh,
                        s.new_ips_threshold,
                        f"used from {fresh} new client addresses in {s.window_seconds:g} s",
                    )
                )
            self._update_baseline(row, count)
            counts[row] = 0
            new_ips[row] = 0
            if now - table.last_seen[row] > _IDLE_SECONDS:
                idle.append(key_id)
        for key_id in idle:
            table.drop(key_id)
        self._judge_failures(now)
        self._failures_by_prefix.clear()
        self._failures_by_ip.clear()

    def _judge_failures(self, now: float) -> None:
        """Refused credentials over the window, by key prefix and by client address."""
        s = self._settings
        for subjects, said in (
            (self._failures_by_prefix, "refused credentials, prefix {subject}, in"),
            (self._failures_by_ip, "refused credentials from {subject} in"),
        ):
            for subject, count in subjects.items():
                if count >= s.auth_failure_threshold:
                    detail = f"{count} {said.format(subject=subject)} {s.window_seconds:g} s"
                    threshold = s.auth_failure_threshold
                    self._raise(Anomaly("auth_failures", now, subject, None, count, threshold,
                                        detail))  # fmt: skip

    def _raise(self, anomaly: Anomaly) -> None:
        self.recent.append(anomaly)
        if self.on_raise is not None:
            self.on_raise(anomaly)
        if self._metrics is not None:
            self._metrics.anomalies.labels(anomaly.kind).inc()
        log.warning(
            "anomaly",
            extra={
                "fields": {
                    "kind": anomaly.kind,
                    "subject": anomaly.subject,
                    "team_id": anomaly.team_id,
                    "detail": anomaly.detail,
                }
            },
        )

    def request(self, key_id: str, team_id: str, client_ip: str) -> None:
        """One authenticated request."""
        now = self._clock()
        self._roll(now)
        table = self._keys
        row = table.rows.get(key_id)
        if row is None:
            row = table.add(key_id, team_id)
        table.count[row] += 1
        memory = self._settings.new_ip_memory_seconds
        seen = table.ip[row]
        if seen is None:
            if not math.isnan(table.baseline[row]):  # a key's first window only learns
                table.new_ips[row] += 1
            # Kept for a day: one copy of each address however many keys use it.
            table.ip[row] = sys.intern(client_ip)
            table.last_seen[row] = now
            return
        if isinstance(seen, str):
            if seen == client_ip and now - table.last_seen[row] <= memory:
                table.last_seen[row] = now
                return
            # A second address (or the first one again after too long): keep a dict.
            seen = table.ip[row] = {seen: table.last_seen[row]}
        last = seen.get(client_ip)
        if last is None or now - last > memory:
            # A key's first window only learns its addresses: they are not "new".
            if not math.isnan(table.baseline[row]):
                table.new_ips[row] += 1
            if len(seen) >= _MAX_IPS_PER_KEY:
                seen.pop(next(iter(seen)))
        seen[client_ip] = now
        table.last_seen[row] = now

    def auth_failure(self, prefix: str | None, client_ip: str) -> None:
        """One refused credential (its display prefix, if it had the key shape)."""
        self._roll(self._clock())
        for table, subject in (
            (self._failures_by_prefix, prefix),
            (self._failures_by_ip, client_ip),
        ):
            if not subject:
                continue
            count = table.get(subject)
            if count is not None:
                table[subject] = count + 1
            elif len(table) < _MAX_FAILURE_SUBJECTS:
                table[subject] = 1

    def tick(self) -> None:
        """Close a finished window even when no request arrives (called periodically)."""
        self._roll(self._clock())
