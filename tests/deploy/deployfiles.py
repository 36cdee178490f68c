"""Where deploy/'s files are and how the tests read them (shared by tests/deploy/test_*.py)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
README = DEPLOY / "README.md"
SBATCH = DEPLOY / "slurm" / "node-agent.sbatch"
RAYJOB = DEPLOY / "k8s" / "rayjob.yaml"
NODE_JOB = DEPLOY / "k8s" / "node-agent-job.yaml"            # GPUDirect Storage variant
NODE_JOB_BASELINE = DEPLOY / "k8s" / "node-agent-job-baseline.yaml"
CLUSTER = DEPLOY / "ray" / "cluster.yaml"
KUBE_FILES = sorted((DEPLOY / "k8s").glob("*.yaml"))
SHELL_FILES = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".sh", ".sbatch"))
DOCKERFILES = sorted(p for p in DEPLOY.glob("docker/Dockerfile.*") if p.suffix != ".dockerignore")


def docs(path: Path) -> dict[str, dict[str, Any]]:
    """The YAML documents of one file, by kind."""
    return {d["kind"]: d for d in yaml.safe_load_all(path.read_text()) if d}


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A container's env entries by name."""
    return {e["name"]: e for e in container.get("env") or []}


def secret_ref(entry: dict[str, Any] | None) -> dict[str, Any] | None:
    """The secretKeyRef of an env entry, if it has one."""
    return ((entry or {}).get("valueFrom") or {}).get("secretKeyRef")


def containers(node: Any) -> Iterator[dict[str, Any]]:
    """Every container (init containers included) anywhere in a Kubernetes object."""
    if isinstance(node, dict):
        for key in ("containers", "initContainers", "ephemeralContainers"):
            if isinstance(node.get(key), list):
                yield from node[key]
        for value in node.values():
            yield from containers(value)
    elif isinstance(node, list):
        for item in node:
            yield from containers(item)


def pod_specs(node: Any, where: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """(path, pod spec) of every pod template in an object: a mapping with ``containers``."""
    if isinstance(node, dict):
        if isinstance(node.get("containers"), list):
            yield where, node
            return
        for key, value in node.items():
            yield from pod_specs(value, f"{where}.{key}" if where else key)
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from pod_specs(item, f"{where}[{i}]")


def pod_templates(node: Any, where: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """(path, PodTemplateSpec) of every ``template``/``submitterPodTemplate`` with a pod spec."""
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{where}.{key}" if where else key
            if key in ("template", "submitterPodTemplate") and isinstance(value, dict) \
                    and isinstance((value.get("spec") or {}).get("containers"), list):
                yield path, value
            else:
                yield from pod_templates(value, path)
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from pod_templates(item, f"{where}[{i}]")


def stated_minimum(text: str, product: str) -> tuple[int, ...]:
    """The version in ``Needs <product> vX.Y.Z or newer`` (the file's stated minimum)."""
    m = re.search(rf"{product} v?(\d+)\.(\d+)\.(\d+) or newer", text)
    assert m, f"no '{product} vX.Y.Z or newer' stated"
    return tuple(int(g) for g in m.groups())
