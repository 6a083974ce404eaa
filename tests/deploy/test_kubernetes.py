"""The Kubernetes manifests: rendered by kustomize, valid for Kubernetes, and consistent
with the gateway's configs (ports, probes, shutdown timing, secrets, selectors)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from gateway.cli import main
from gateway.config import Settings, load_settings, parse_listen, settings_from_mapping

from ._support import (
    CONFIG_DIR,
    KUSTOMIZATIONS,
    SAMPLE_SECRETS,
    SECRET_NAME,
    container_env,
    find,
    load_yaml,
    mounted_config,
    one,
    render,
    selects,
    use_only,
    workloads,
)

# The oldest Kubernetes the manifests support (the sidecar example's preStop
# `sleep` action needs 1.30), or the oldest the validator still ships, and the
# newest it knows.
_KNOWN = kubernetes_validate.utils.all_versions()
K8S_VERSIONS = (next((v for v in _KNOWN if v.startswith("1.30.")), _KNOWN[0]), _KNOWN[-1])
# Custom resources have no schema in kubernetes-validate (it ships only the core
# API); they are checked structurally in test_pod_monitor_scrapes_the_status_port.
CUSTOM_KINDS = {"PodMonitor"}

SHAPES = list(KUSTOMIZATIONS)


def settings_for(docs: tuple[dict[str, Any], ...], workload: Any, container: Any) -> Settings:
    """The settings a container would run with: its mounted config and its environment."""
    key = mounted_config(docs, workload, container)
    raw = load_yaml(CONFIG_DIR / key)
    env = container_env(docs, container)
    with pytest.MonkeyPatch.context() as mp:
        use_only(mp, env)
        return settings_from_mapping(raw, key)


def gateway_deployment(docs: tuple[dict[str, Any], ...]) -> tuple[Any, Any]:
    deployment = one(docs, "Deployment", "gateway")
    containers = deployment["spec"]["template"]["spec"]["containers"]
    return deployment, next(c for c in containers if c["name"] == "gateway")


def pod_labels(workload: Any) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"]["labels"]
    return labels


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("shape", SHAPES)
def test_rendered_manifests_validate_against_the_kubernetes_schemas(
    shape: str, version: str
) -> None:
    docs = render(KUSTOMIZATIONS[shape])
    checked = 0
    for doc in docs:
        if doc["kind"] in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{shape}: {doc['kind']}/{doc['metadata']['name']}: {where}: {exc.message}")
        checked += 1
    assert checked >= 7


def test_the_validator_is_strict_enough_to_catch_a_typo() -> None:
    # Guards the test above: a misspelt field must fail, not pass unnoticed.
    deployment, _ = gateway_deployment(render(KUSTOMIZATIONS["base"]))
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


def test_the_config_kustomization_renders_both_configs() -> None:
    docs = render(CONFIG_DIR)
    data = one(docs, "ConfigMap")["data"]
    files = {p.name for p in CONFIG_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(data) == files
    for name in files:
        assert data[name] == (CONFIG_DIR / name).read_text(encoding="utf-8")


@pytest.mark.parametrize("shape", SHAPES)
def test_no_secret_values_only_references(shape: str) -> None:
    secret_vars = {
        "GATEWAY_ADMIN_TOKEN",
        "GATEWAY_STORAGE",
        "GATEWAY_POSTGRES_LISTEN_DSN",
        "GATEWAY_LIMITER",
    }
    docs = render(KUSTOMIZATIONS[shape])
    assert find(docs, "Secret") == []
    for config_map in find(docs, "ConfigMap"):
        if config_map["metadata"]["name"].startswith("gateway-env"):
            assert not secret_vars & set(config_map["data"])
    for workload in workloads(docs):
        for container in workload["spec"]["template"]["spec"]["containers"]:
            for var in container.get("env", []):
                if var["name"] in secret_vars:
                    ref = var["valueFrom"]["secretKeyRef"]
                    assert ref["name"] == SECRET_NAME
                    assert ref["key"] in SAMPLE_SECRETS
    _, gateway = gateway_deployment(docs)
    assert {v["name"] for v in gateway["env"]} >= secret_vars


@pytest.mark.parametrize("shape", SHAPES)
def test_gateway_containers_pass_check_config_with_the_manifest_environment(
    shape: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    docs = render(KUSTOMIZATIONS[shape])
    checked = []
    for workload in workloads(docs):
        for container in workload["spec"]["template"]["spec"]["containers"]:
            args = container.get("args", [])
            if not args or args[0] not in ("run", "migrate"):
                continue
            checked.append(args[0])
            key = mounted_config(docs, workload, container)
            text = (CONFIG_DIR / key).read_text(encoding="utf-8")
            path = tmp_path / f"{shape}-{workload['metadata']['name']}-{key}"
            path.write_text(text, encoding="utf-8")
            with monkeypatch.context() as mp:
                use_only(mp, container_env(docs, container))
                if args[0] == "run":
                    main(["check-config", str(path)])
                    assert "OK" in capsys.readouterr().out
                else:
                    # What `gateway migrate` loads: no admin listener, so no token needed.
                    settings = load_settings(path, serving=False)
                    assert settings.storage_kind == "postgresql"
                    assert not settings.postgres.migrate_on_start
    assert sorted(checked) == ["migrate", "run"]


@pytest.mark.parametrize("shape", SHAPES)
def test_gateway_pod_ports_and_probes_match_its_config(shape: str) -> None:
    docs = render(KUSTOMIZATIONS[shape])
    deployment, container = gateway_deployment(docs)
    settings = settings_for(docs, deployment, container)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {
        "http": parse_listen(settings.listen)[1],
        "status": parse_listen(settings.status.listen)[1],
    }
    assert ports["status"] == 9091
    # The admin listener stays inside the pod.
    assert parse_listen(settings.admin.listen)[0] == "127.0.0.1"
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "status"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "status"}
    # The gateway fails its own readiness on SIGTERM: no preStop needed or wanted.
    assert "lifecycle" not in container


@pytest.mark.parametrize("shape", SHAPES)
def test_termination_grace_outlasts_readiness_delay_and_drain(shape: str) -> None:
    docs = render(KUSTOMIZATIONS[shape])
    deployment, container = gateway_deployment(docs)
    settings = settings_for(docs, deployment, container)
    pod = deployment["spec"]["template"]["spec"]
    shutdown = settings.shutdown.readiness_delay_seconds + settings.shutdown.drain_seconds
    assert pod["terminationGracePeriodSeconds"] > shutdown
    for other in pod["containers"]:
        pre_stop = other.get("lifecycle", {}).get("preStop", {}).get("sleep")
        if pre_stop:
            # A backend beside the gateway must outlive its drain, and the pod both.
            assert pre_stop["seconds"] > shutdown
            assert pod["terminationGracePeriodSeconds"] > pre_stop["seconds"]


@pytest.mark.parametrize("shape", SHAPES)
def test_every_pod_runs_non_root_on_a_read_only_root_fs(shape: str) -> None:
    # The "restricted" Pod Security Standard, which the overlays' namespaces enforce.
    docs = render(KUSTOMIZATIONS[shape])
    for workload in workloads(docs):
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod.get("automountServiceAccountToken") is False
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"]["drop"] == ["ALL"]
            assert "memory" in container["resources"]["limits"]
            assert container["resources"]["requests"]
    for namespace in find(docs, "Namespace"):
        assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == (
            "restricted"
        )


@pytest.mark.parametrize("shape", SHAPES)
def test_selectors_pick_serving_pods_and_never_the_migration(shape: str) -> None:
    docs = render(KUSTOMIZATIONS[shape])
    deployment, _ = gateway_deployment(docs)
    serving = pod_labels(deployment)
    migration = pod_labels(one(docs, "Job", "gateway-migrate"))
    assert selects(deployment["spec"]["selector"]["matchLabels"], serving)

    service = one(docs, "Service", "gateway")
    pdb = one(docs, "PodDisruptionBudget", "gateway")
    monitor = one(docs, "PodMonitor", "gateway")
    for selector in (
        service["spec"]["selector"],
        pdb["spec"]["selector"]["matchLabels"],
        monitor["spec"]["selector"]["matchLabels"],
    ):
        assert selects(selector, serving)
        assert not selects(selector, migration)
    # The public port only: status is scraped per pod, admin stays on loopback.
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(80, "http")]


@pytest.mark.parametrize("shape", SHAPES)
def test_pod_monitor_scrapes_the_status_port(shape: str) -> None:
    docs = render(KUSTOMIZATIONS[shape])
    monitor = one(docs, "PodMonitor", "gateway")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    deployment, container = gateway_deployment(docs)
    named_ports = {p["name"] for p in container["ports"]}
    endpoints = monitor["spec"]["podMetricsEndpoints"]
    assert [(e["port"], e["path"]) for e in endpoints] == [("status", "/metrics")]
    assert endpoints[0]["port"] in named_ports
    # job="gateway", as in prometheus.yml, so the same alert rules apply.
    assert pod_labels(deployment)[monitor["spec"]["jobLabel"]] == "gateway"


@pytest.mark.parametrize("shape", SHAPES)
def test_migration_job_runs_gateway_migrate_once(shape: str) -> None:
    docs = render(KUSTOMIZATIONS[shape])
    job = one(docs, "Job", "gateway-migrate")
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"][0] == "migrate"
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    deployment, gateway = gateway_deployment(docs)
    # The Job migrates the database the pods use, with the config they run.
    assert container["image"] == gateway["image"]
    assert mounted_config(docs, job, container) == mounted_config(docs, deployment, gateway)
    job_env = container_env(docs, container)
    assert job_env["GATEWAY_STORAGE"] == container_env(docs, gateway)["GATEWAY_STORAGE"]


@pytest.mark.parametrize("shape", ["base", "edge"])
def test_edge_backend_admits_gateway_pods_only(shape: str) -> None:
    docs = render(KUSTOMIZATIONS[shape])
    (policy,) = find(docs, "NetworkPolicy")
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    (rule,) = spec["ingress"]
    (peer,) = rule["from"]
    assert set(peer) == {"podSelector"}, "only pods, no namespace- or IP-wide allowance"
    deployment, container = gateway_deployment(docs)
    job = one(docs, "Job", "gateway-migrate")
    assert selects(peer["podSelector"]["matchLabels"], pod_labels(deployment))
    assert not selects(peer["podSelector"]["matchLabels"], pod_labels(job))
    # The gateway's upstream is the port this policy opens.
    upstream = settings_for(docs, deployment, container).upstreams["assess"].url
    assert [p["port"] for p in rule["ports"]] == [int(upstream.rsplit(":", 1)[1])]
    if shape == "edge":
        backend = one(docs, "Deployment", "assess")
        assert selects(spec["podSelector"]["matchLabels"], pod_labels(backend))
        service = one(docs, "Service", "assess")
        assert (
            upstream
            == f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
        )
        assert selects(service["spec"]["selector"], pod_labels(backend))


def test_sidecar_backend_listens_on_loopback_only() -> None:
    docs = render(KUSTOMIZATIONS["sidecar"])
    assert find(docs, "NetworkPolicy") == []
    deployment, gateway = gateway_deployment(docs)
    containers = {c["name"]: c for c in deployment["spec"]["template"]["spec"]["containers"]}
    assert set(containers) == {"gateway", "assess"}
    backend = containers["assess"]
    assert "ports" not in backend, "a loopback-only backend has no port to declare"
    args = backend["args"]
    host, port = args[args.index("--host") + 1], args[args.index("--port") + 1]
    assert host == "127.0.0.1"
    upstream = settings_for(docs, deployment, gateway).upstreams["assess"].url
    assert upstream == f"http://127.0.0.1:{port}"
    # The kubelet probes the pod IP, where a loopback listener is not: exec probes only.
    assert "exec" in backend["readinessProbe"]
    assert (
        deployment["spec"]["template"]["metadata"]["annotations"][
            "kubectl.kubernetes.io/default-container"
        ]
        == "gateway"
    )


@pytest.mark.parametrize("shape", SHAPES)
def test_every_config_map_reference_resolves(shape: str) -> None:
    # kustomize appends a content hash to generated names; a reference it did not
    # rewrite would point at a ConfigMap that does not exist.
    docs = render(KUSTOMIZATIONS[shape])
    names = {d["metadata"]["name"] for d in find(docs, "ConfigMap")}
    for workload in workloads(docs):
        pod = workload["spec"]["template"]["spec"]
        for volume in pod.get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in names
        for container in pod["containers"]:
            for source in container.get("envFrom", []):
                assert source["configMapRef"]["name"] in names
