"""Every gateway config under deploy/config is used by something that is tested with
the environment it sets (tests in test_kubernetes and test_compose), and is documented."""

from __future__ import annotations

import json
import re

from ._support import (
    COMPOSE_FILE,
    CONFIG_DIR,
    DEPLOY,
    KUSTOMIZATIONS,
    REPO,
    SAMPLE_SECRETS,
    load_yaml,
    mounted_config,
    render,
    workloads,
)


def configs() -> set[str]:
    return {p.name for p in CONFIG_DIR.glob("*.yaml")} - {"kustomization.yaml"}


def test_every_config_is_deployed_somewhere() -> None:
    used: set[str] = set()
    for directory in KUSTOMIZATIONS.values():
        docs = render(directory)
        for workload in workloads(docs):
            for container in workload["spec"]["template"]["spec"]["containers"]:
                if "--config" in container.get("args", []):
                    used.add(mounted_config(docs, workload, container))
    compose = COMPOSE_FILE.read_text(encoding="utf-8")
    used |= {name for name in configs() if f"../config/{name}:" in compose}
    dockerfile = (REPO / "Dockerfile").read_text(encoding="utf-8")
    used |= {name for name in configs() if f"COPY deploy/config/{name} " in dockerfile}
    assert used == configs()


def test_readme_documents_every_secret_key_and_config() -> None:
    readme = (DEPLOY / "README.md").read_text(encoding="utf-8")
    for key in SAMPLE_SECRETS:
        assert key in readme, f"deploy/README.md does not say how to set {key}"
    for name in configs():
        assert name in readme
        # The values only: the files' comments mention ${VAR} in prose.
        values = json.dumps(load_yaml(CONFIG_DIR / name))
        for variable in re.findall(r"\$\{(\w+)", values):
            assert f"`{variable}`" in readme, f"{name} reads {variable}; the README must say so"
