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
import sys
import time
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


@dataclass(frozen=True, slots=True)
class Anomaly:
    kind: str  # rate_spike | new_ips | auth_failures
    at: float
    subject: str  # what it is about: a key id, a key prefix or a client address
    team_id: str | None
    observed: float
    threshold: float
    detail: str


@dataclass(slots=True)
class _KeyState:
    team_id: str
    count: int = 0
    baseline: float | None = None
    # The addresses seen and when. Most keys are used from one address, and an
    # empty dict alone costs more than the rest of this state: the first
    # address is kept in ``ip`` (seen at ``last_seen``), a dict only from the second.
    ip: str | None = None
    more_ips: dict[str, float] | None = None
    new_ips: int = 0
    last_seen: float = 0.0


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
        self._keys: dict[str, _KeyState] = {}
        self._failures_by_prefix: dict[str, int] = {}
        self._failures_by_ip: dict[str, int] = {}
        self.recent: deque[Anomaly] = deque(maxlen=_MAX_RECENT)
        self._alpha = 2.0 / (settings.baseline_windows + 1)

    def _window_of(self, now: float) -> int:
        return int(now // self._settings.window_seconds)

    def _roll(self, now: float) -> None:
        window = self._window_of(now)
        if window == self._window:
            return
        self._close_window(now)
        # Windows with no traffic at all also count towards the baselines.
        for _ in range(min(window - self._window - 1, self._settings.baseline_windows)):
            for state in self._keys.values():
                self._update_baseline(state, 0)
        self._window = window

    def _update_baseline(self, state: _KeyState, count: int) -> None:
        if state.baseline is None:
            state.baseline = float(count)
        else:
            state.baseline += self._alpha * (count - state.baseline)

    def _close_window(self, now: float) -> None:
        s = self._settings
        idle: list[str] = []
        for key_id, state in self._keys.items():
            baseline = state.baseline
            if baseline is not None:
                limit = max(s.rate_spike_min_requests, s.rate_spike_factor * baseline)
                if state.count >= limit:
                    self._raise(
                        Anomaly(
                            "rate_spike",
                            now,
                            key_id,
                            state.team_id,
                            state.count,
                            limit,
                            f"{state.count} requests in {s.window_seconds:g} s against a recent "
                            f"mean of {baseline:.1f}",
                        )
                    )
            if state.new_ips >= s.new_ips_threshold:
                self._raise(
                    Anomaly(
                        "new_ips",
                        now,
                        key_id,
                        state.team_id,
                        state.new_ips,
                        s.new_ips_threshold,
                        f"used from {state.new_ips} new client addresses in {s.window_seconds:g} s",
                    )
                )
            self._update_baseline(state, state.count)
            state.count = 0
            state.new_ips = 0
            if now - state.last_seen > _IDLE_SECONDS:
                idle.append(key_id)
        for key_id in idle:
            del self._keys[key_id]
        for subject, count in self._failures_by_prefix.items():
            if count >= s.auth_failure_threshold:
                self._raise(
                    Anomaly(
                        "auth_failures",
                        now,
                        subject,
                        None,
                        count,
                        s.auth_failure_threshold,
                        f"{count} refused credentials, prefix {subject}, in {s.window_seconds:g} s",
                    )
                )
        for subject, count in self._failures_by_ip.items():
            if count >= s.auth_failure_threshold:
                self._raise(
                    Anomaly(
                        "auth_failures",
                        now,
                        subject,
                        None,
                        count,
                        s.auth_failure_threshold,
                        f"{count} refused credentials from {subject} in {s.window_seconds:g} s",
                    )
                )
        self._failures_by_prefix.clear()
        self._failures_by_ip.clear()

    def _raise(self, anomaly: Anomaly) -> None:
        self.recent.append(anomaly)
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
        state = self._keys.get(key_id)
        if state is None:
            state = self._keys[key_id] = _KeyState(team_id)
        state.count += 1
        memory = self._settings.new_ip_memory_seconds
        if state.more_ips is None:
            if state.ip is None:
                if state.baseline is not None:
                    state.new_ips += 1
                # Kept for a day: one copy of each address however many keys use it.
                state.ip = sys.intern(client_ip)
                state.last_seen = now
                return
            if state.ip == client_ip and now - state.last_seen <= memory:
                state.last_seen = now
                return
            # A second address (or the first one again after too long): keep a dict.
            state.more_ips = {state.ip: state.last_seen}
        seen = state.more_ips
        last = seen.get(client_ip)
        if last is None or now - last > memory:
            # A key's first window only learns its addresses: they are not "new".
            if state.baseline is not None:
                state.new_ips += 1
            if len(seen) >= _MAX_IPS_PER_KEY:
                seen.pop(next(iter(seen)))
        seen[client_ip] = now
        state.last_seen = now

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
