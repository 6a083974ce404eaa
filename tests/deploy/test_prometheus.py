"""Prometheus scrape config and alerting rules: promtool accepts them, the unit tests
in deploy/prometheus/alerts_test.yml pass, and every rule reads real metric names."""

from __future__ import annotations

from typing import Any

import pytest

from ._support import (
    PROMETHEUS_DIR,
    exposed_metric_names,
    load_yaml,
    promql_metric_names,
    run,
    tool,
)

PROMTOOL_HINT = "apt-get install prometheus (Debian's package ships promtool)"


def promtool(*args: str) -> None:
    result = run([tool("promtool", PROMTOOL_HINT), *args], cwd=PROMETHEUS_DIR)
    assert result.returncode == 0, result.stdout + result.stderr


def rules() -> list[dict[str, Any]]:
    return [
        rule
        for group in load_yaml(PROMETHEUS_DIR / "alerts.yml")["groups"]
        for rule in group["rules"]
    ]


def test_promtool_check_config() -> None:
    promtool("check", "config", "prometheus.yml")


def test_promtool_check_rules() -> None:
    promtool("check", "rules", "alerts.yml")


def test_promtool_unit_tests_of_the_alerts() -> None:
    tests = load_yaml(PROMETHEUS_DIR / "alerts_test.yml")
    tested = {t["alertname"] for case in tests["tests"] for t in case["alert_rule_test"]}
    assert len(tested) >= 2
    promtool("test", "rules", "alerts_test.yml")


def test_alerts_read_only_metrics_the_gateway_exposes() -> None:
    known = exposed_metric_names() | {"up"}
    used: set[str] = set()
    for rule in rules():
        names = promql_metric_names(rule["expr"])
        assert names, rule["alert"]
        assert names <= known, f"{rule['alert']}: unknown {sorted(names - known)}"
        used |= names
    # What the rules are for: errors, latency, limiter, backends, ledger, auth,
    # anomalies, webhook deliveries and the instances themselves.
    assert {
        "up",
        "gateway_requests_total",
        "gateway_request_duration_seconds_bucket",
        "gateway_limiter_degraded",
        "gateway_backend_errors_total",
        "gateway_reservations_pending",
        "gateway_ledger_flush_lag_seconds",
        "gateway_ledger_late_resolutions_total",
        "gateway_auth_failures_total",
        "gateway_anomalies_total",
        "gateway_webhook_queue_oldest_seconds",
        "gateway_webhook_deliveries_total",
    } <= used


@pytest.mark.parametrize("rule", rules(), ids=lambda r: r["alert"])
def test_every_alert_says_how_bad_and_what(rule: dict[str, Any]) -> None:
    assert rule["labels"]["severity"] in ("critical", "warning", "info")
    assert rule["annotations"]["summary"]
    assert rule["annotations"]["description"]
