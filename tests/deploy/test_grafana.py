"""The Grafana dashboard: valid JSON, a datasource variable, and PromQL that promtool
parses and that reads only metrics gateway/metrics.py defines."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from ._support import DASHBOARD, exposed_metric_names, promql_metric_names, run, tool

# Grafana's own variables, replaced by what a query would really get.
_VARIABLE = re.compile(r"\$\{?(\w+)\}?")
_LABEL_VALUES = re.compile(r"label_values\(\s*(\w+)\s*,\s*(\w+)\s*\)")


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def expressions(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]


def concrete(expr: str) -> str:
    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        return "5m" if name in ("__rate_interval", "__interval", "__range") else ".*"

    return _VARIABLE.sub(substitute, expr)


def test_dashboard_shape(dashboard: dict[str, Any]) -> None:
    assert isinstance(dashboard["schemaVersion"], int) and 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard["uid"] and dashboard["title"]
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids))
    for panel in panels(dashboard):
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24


def test_datasource_is_a_variable(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"]["uid"] == "${datasource}"


def test_expressions_read_only_metrics_the_gateway_exposes(dashboard: dict[str, Any]) -> None:
    known = exposed_metric_names()
    used: set[str] = set()
    for title, expr in expressions(dashboard):
        names = promql_metric_names(concrete(expr))
        assert names, title
        assert names <= known, f"{title}: unknown {sorted(names - known)}"
        used |= names
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            metric, _ = _LABEL_VALUES.fullmatch(variable["query"]["query"]).groups()  # type: ignore[union-attr]
            assert metric in known
    # The panels an operator needs: traffic and outcomes, latency, credits,
    # limiter, backends, the ledger backlog and anomalies.
    assert {
        "gateway_requests_total",
        "gateway_request_duration_seconds_bucket",
        "gateway_upstream_duration_seconds_bucket",
        "gateway_credits_total",
        "gateway_limiter_degraded",
        "gateway_rate_limit_decisions_total",
        "gateway_backend_call_duration_seconds_bucket",
        "gateway_backend_errors_total",
        "gateway_reservations_pending",
        "gateway_anomalies_total",
    } <= used


def test_expressions_are_valid_promql(dashboard: dict[str, Any], tmp_path: Path) -> None:
    # promtool has no bare query checker; as recording rules, each expression is
    # parsed by Prometheus' own parser.
    rules = [
        {"record": f"dashboard:panel_{i}", "expr": concrete(expr)}
        for i, (_, expr) in enumerate(expressions(dashboard))
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run([tool("promtool", "apt-get install prometheus"), "check", "rules", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr
