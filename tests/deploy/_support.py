"""Helpers for the deployment tests: paths, tools, rendered manifests, metric names."""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.metrics import Metrics

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
CONFIG_DIR = DEPLOY / "config"
KUBERNETES = DEPLOY / "kubernetes"
KUSTOMIZATIONS = {
    "base": KUBERNETES / "base",
    "edge": KUBERNETES / "overlays" / "edge",
    "sidecar": KUBERNETES / "overlays" / "sidecar",
}
COMPOSE_FILE = DEPLOY / "compose" / "compose.yaml"
PROMETHEUS_DIR = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "gateway-dashboard.json"

# Stand-ins for the Secret the operator creates (gateway-secrets): shaped like the
# real thing so the config validation that reads them is meaningful.
SAMPLE_SECRETS = {
    "admin-token": "sample-admin-token-0123456789abcdef",
    "storage-dsn": "postgresql://gateway:sample-password@postgres.db.svc:5432/gateway",
    "listen-dsn": "postgresql://gateway:sample-password@postgres.db.svc:5432/gateway",
    "limiter-url": "redis://:sample-password@redis.db.svc:6379/0",
}
SECRET_NAME = "gateway-secrets"


def tool(name: str, install_hint: str) -> str:
    """The path of a command-line tool these tests need, or a failure saying how to get it."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: {install_hint}")
    return path


def run(args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


@functools.cache
def render(directory: Path) -> tuple[dict[str, Any], ...]:
    """What `kubectl apply -k directory` would send, as parsed documents."""
    kustomize = shutil.which("kustomize")
    if kustomize:
        args = [kustomize, "build", str(directory)]
    else:
        kubectl = tool("kubectl", "apt-get install kubernetes-client (it embeds kustomize)")
        args = [kubectl, "kustomize", str(directory)]
    result = run(args)
    assert result.returncode == 0, f"kustomize failed on {directory}:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def find(docs: tuple[dict[str, Any], ...], kind: str, name: str | None = None) -> list[Any]:
    return [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]


def one(docs: tuple[dict[str, Any], ...], kind: str, name: str | None = None) -> Any:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def workloads(docs: tuple[dict[str, Any], ...]) -> Iterator[Any]:
    """Every object that carries a pod template."""
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield doc


def selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def config_map_data(docs: tuple[dict[str, Any], ...], name: str) -> dict[str, str]:
    data: dict[str, str] = one(docs, "ConfigMap", name)["data"]
    return data


def container_env(docs: tuple[dict[str, Any], ...], container: Any) -> dict[str, str]:
    """The environment a container starts with, secrets replaced by sample values."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        assert "secretRef" not in source, "secrets are referenced key by key, never wholesale"
        env.update(config_map_data(docs, source["configMapRef"]["name"]))
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
            continue
        ref = var["valueFrom"]
        if "secretKeyRef" in ref:
            assert ref["secretKeyRef"]["name"] == SECRET_NAME
            env[var["name"]] = SAMPLE_SECRETS[ref["secretKeyRef"]["key"]]
        else:
            cm = ref["configMapKeyRef"]
            env[var["name"]] = config_map_data(docs, cm["name"])[cm["key"]]
    return env


def mounted_config(docs: tuple[dict[str, Any], ...], workload: Any, container: Any) -> str:
    """The key in gateway-config that the container's `--config` path resolves to."""
    args = container.get("args", [])
    path = args[args.index("--config") + 1]
    pod = workload["spec"]["template"]["spec"]
    for mount in container.get("volumeMounts", []):
        prefix = mount["mountPath"].rstrip("/") + "/"
        if not path.startswith(prefix):
            continue
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        for item in volume["configMap"]["items"]:
            if item["path"] == path.removeprefix(prefix):
                assert volume["configMap"]["name"].startswith("gateway-config")
                key: str = item["key"]
                return key
    raise AssertionError(f"{path} is not on a volume mounted from gateway-config")


def exposed_metric_names() -> set[str]:
    """Every series name /metrics can show, derived from gateway/metrics.py itself."""
    names: set[str] = set()
    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
    }
    for family in Metrics().registry.collect():
        names.update(family.name + s for s in suffixes[family.type])
    return names


_GROUPING = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", re.IGNORECASE
)
# A whole identifier (not a piece of one, nor of a number) that is not a function call.
_IDENT = re.compile(r"(?<![\w:.])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()")
_KEYWORDS = {
    "and", "or", "unless", "bool", "offset", "inf", "nan",
    "by", "without", "on", "ignoring", "group_left", "group_right",
}  # fmt: skip


def promql_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (strings, matchers, ranges and groupings aside)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = _GROUPING.sub("", text)
    return {m for m in _IDENT.findall(text) if m.lower() not in _KEYWORDS}


def use_only(mp: pytest.MonkeyPatch, env: Mapping[str, str]) -> None:
    """Make ``env`` the configs' whole view of the environment: nothing leaks in from
    the shell running the tests (a GATEWAY_ADMIN_TOKEN there would hide a missing one)."""
    for name in list(os.environ):
        if name.startswith(("GATEWAY_", "ASSESS_")):
            mp.delenv(name)
    for name, value in env.items():
        mp.setenv(name, value)


def load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as f:
        return yaml.safe_load(f)
