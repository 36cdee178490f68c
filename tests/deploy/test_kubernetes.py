"""deploy/k8s against the systems that will read it: Kubernetes' own object schemas
(kubernetes-validate, strict, every Kubernetes version it ships), KubeRay's RayJob CRD schema
of each supported release (strict: unknown fields are errors, as `kubectl apply` makes them),
the rules KubeRay applies to token authentication, and the Pod Security Standards."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from deployfiles import (DEPLOY, KUBE_FILES, NODE_JOB, NODE_JOB_BASELINE, RAYJOB, README,
                         containers, docs, env_of, pod_specs, pod_templates, stated_minimum)
from pod_security import baseline_violations, restricted_violations

try:  # the dev extra has it; without it only the Kubernetes schema checks are skipped
    import kubernetes_validate
except ImportError:
    kubernetes_validate = None

CRDS = Path(__file__).parent / "kuberay"
KUBERAY = {tuple(int(x) for x in m.groups()): p for p in sorted(CRDS.glob("rayjob-v*.json"))
           if (m := re.search(r"v(\d+)\.(\d+)\.(\d+)", p.name))}
K8S_VERSIONS = sorted(set(kubernetes_validate.utils.all_versions() if kubernetes_validate else []),
                      key=lambda v: tuple(map(int, v.split("."))))
# KubeRay creates `<RayJob name>-head-svc` for a RayJob's cluster from v1.5.0 on
# (RayJobReconciler.reconcileServices); before, only the generated cluster's name has one.
RAYJOB_HEAD_SVC_SINCE = (1, 5, 0)
TOKEN_ENV = {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"}


def _objects() -> list[Any]:
    out = []
    for path in KUBE_FILES:
        rel = str(path.relative_to(DEPLOY))
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc["apiVersion"] != "ray.io/v1":
                out.append(pytest.param(doc, id=f"{rel}:{doc['kind']}"))
            elif doc:  # KubeRay objects: Kubernetes checks their embedded pod templates
                for where, tmpl in pod_templates(doc["spec"]):
                    wrapped = {"apiVersion": "v1", "kind": "PodTemplate",
                               "metadata": {"name": "t"}, "template": tmpl}
                    out.append(pytest.param(wrapped, id=f"{rel}:{where}"))
    return out


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("obj", _objects())
def test_kubernetes_objects_pass_strict_validation(obj: dict[str, Any], version: str) -> None:
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"Kubernetes {version}: {exc.message} at {'.'.join(map(str, exc.path))}")


def test_kubernetes_validate_covers_the_stated_range() -> None:
    if kubernetes_validate is None:
        pytest.skip("kubernetes-validate is not installed (pip install -e '.[dev]')")
    assert K8S_VERSIONS[0] == "1.25.0" and len(K8S_VERSIONS) >= 13, K8S_VERSIONS


# --------------------------------------------------------------------------------------
# KubeRay
# --------------------------------------------------------------------------------------


def unknown_fields(obj: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Fields of ``obj`` that a CRD's structural ``schema`` does not declare (the API server
    prunes them; kubectl's default strict field validation refuses the object)."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    out: list[str] = []
    if isinstance(obj, dict):
        props, extra = schema.get("properties"), schema.get("additionalProperties")
        for key, value in obj.items():
            if props is not None and key not in props:
                out.append(f"{path}.{key}".lstrip("."))
            elif props is not None:
                out += unknown_fields(value, props[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                out += unknown_fields(value, extra, f"{path}.{key}")
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(obj):
            out += unknown_fields(item, schema["items"], f"{path}[{i}]")
    return out


def crd_problems(obj: dict[str, Any], version: tuple[int, ...]) -> list[str]:
    """Why KubeRay ``version``'s RayJob CRD (the vendored schema) refuses ``obj``."""
    schema = json.loads(KUBERAY[version].read_text())
    errors = [f"{e.message} at {'.'.join(map(str, e.path))}"
              for e in jsonschema.Draft7Validator(schema).iter_errors(obj)]
    return errors + [f"unknown field {f}" for f in unknown_fields(obj, schema)]


def _rayjob() -> dict[str, Any]:
    return docs(RAYJOB)["RayJob"]


def _minimum() -> tuple[int, ...]:
    return stated_minimum(RAYJOB.read_text(), "KubeRay")


def test_rayjob_passes_every_supported_kuberay_crd() -> None:
    supported = [v for v in KUBERAY if v >= _minimum()]
    assert supported, f"no vendored CRD for KubeRay {_minimum()} or newer"
    for version in supported:
        assert not crd_problems(_rayjob(), version), (version, crd_problems(_rayjob(), version))


def test_stated_minimum_kuberay_is_the_first_that_accepts_the_rayjob() -> None:
    older = [v for v in KUBERAY if v < _minimum()]
    assert older, "vendor the CRD of the release before the stated minimum"
    assert crd_problems(_rayjob(), max(older)), f"{max(older)} accepts it: the minimum is too high"


def test_rayjob_turns_token_auth_on_through_auth_options() -> None:
    """KubeRay's dashboard client sends the token only when authOptions.mode is "token", and
    reads it from authOptions.secretName (GetRayDashboardClientFunc, utils/util.go)."""
    job = _rayjob()
    cluster = job["spec"]["rayClusterSpec"]
    auth = cluster.get("authOptions") or {}
    assert auth.get("mode") == "token", "rayClusterSpec.authOptions.mode must be token"
    assert auth.get("secretName") == "formatlab-ray-token", auth
    assert "formatlab-ray-token" in README.read_text()  # the Secret the README creates
    # KubeRay refuses token mode below Ray 2.52 (ValidateRayClusterSpec).
    ray = tuple(int(x) for x in cluster["rayVersion"].split("."))
    assert ray >= (2, 52, 0), cluster["rayVersion"]
    prep = (DEPLOY / "docker" / "Dockerfile.prep").read_text()
    assert f"ARG RAY_VERSION={cluster['rayVersion']}" in prep
    # KubeRay sets the token variables on every Ray container and the submitter from that
    # Secret; a container's own value would win over it and could disagree with the client.
    for container in containers(job):
        own = TOKEN_ENV & env_of(container).keys()
        assert not own, f"{container['name']} sets {own} itself"


def test_readme_reaches_the_rayjob_the_way_the_stated_kuberay_allows() -> None:
    text = README.read_text()
    name = _rayjob()["metadata"]["name"]
    if f"svc/{name}-head-svc" in text:
        assert _minimum() >= RAYJOB_HEAD_SVC_SINCE, "svc/<rayjob>-head-svc needs KubeRay 1.5"
    assert f"KubeRay v{'.'.join(map(str, _minimum()))}" in text, "README states another minimum"
    # A wait on the RayJob must end when the job fails too, not only when it succeeds.
    waits = [line for line in text.splitlines() if "rayjob" in line and
             ("kubectl wait" in line or line.lstrip().startswith("until"))]
    assert waits, "README has no command that waits for the RayJob"
    for line in waits:
        assert "kubectl wait" not in line or "jobStatus}'=SUCCEEDED" not in line, line
        assert "Complete" in line and "Failed" in line, f"does not stop on failure: {line}"
    schema = json.loads(KUBERAY[_minimum()].read_text())
    status = schema["properties"]["status"]["properties"]
    for field in re.findall(r"\{\.status\.(\w+)\}", text):
        assert field in status, f"README reads .status.{field}, which the RayJob does not have"


# --------------------------------------------------------------------------------------
# GPU pods: only the GPU they were given, no privilege
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [NODE_JOB, NODE_JOB_BASELINE], ids=lambda p: p.name)
def test_gpu_pods_get_their_gpus_from_the_device_plugin_without_privilege(path: Path) -> None:
    (pod,) = [spec for _, spec in pod_specs(docs(path)["Job"])]
    for container in containers(pod):
        sc = container.get("securityContext") or {}
        assert not sc.get("privileged"), f"{container['name']}: privileged sees every GPU"
        assert sc.get("allowPrivilegeEscalation") is False
        assert "ALL" in (sc.get("capabilities") or {}).get("drop", [])
        assert not (sc.get("capabilities") or {}).get("add"), "GDS on local NVMe needs none"
        gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
        local_rank = int(env_of(container)["LOCAL_RANK"]["value"])
        assert 0 <= local_rank < gpus, "LOCAL_RANK must index the GPUs this pod was given"
    # Device files through hostPath pass no device cgroup: the runtime must grant them.
    for volume in pod.get("volumes") or []:
        assert not (volume.get("hostPath") or {}).get("path", "").startswith("/dev"), volume


def test_gds_variant_asks_the_container_toolkit_for_the_nvidia_fs_devices() -> None:
    (pod,) = [spec for _, spec in pod_specs(docs(NODE_JOB)["Job"])]
    (container,) = pod["containers"]
    assert env_of(container)["NVIDIA_GDS"]["value"] == "enabled"
    args = container["args"]
    assert args[args.index("--loader") + 1] == "dali_gds"
    # Its only departure from "baseline": the node's NVMe and udev through hostPath.
    assert all(v.startswith("hostPath volume") for v in baseline_violations(pod)), \
        baseline_violations(pod)


def test_baseline_variant_passes_pod_security_baseline_and_restricted() -> None:
    (pod,) = [spec for _, spec in pod_specs(docs(NODE_JOB_BASELINE)["Job"])]
    assert baseline_violations(pod) == []
    assert restricted_violations(pod) == []
    (container,) = pod["containers"]
    args = container["args"]
    assert args[args.index("--loader") + 1] != "dali_gds"
    assert "NVIDIA_GDS" not in env_of(container)


def test_rayjob_pods_pass_pod_security_baseline() -> None:
    for where, pod in pod_specs(_rayjob()["spec"]):
        assert baseline_violations(pod) == [], where


def test_pod_security_checks_can_refuse() -> None:
    """The checks above are only worth something if they see a violation."""
    (pod,) = [spec for _, spec in pod_specs(docs(NODE_JOB)["Job"])]
    privileged = json.loads(json.dumps(pod))
    privileged["containers"][0]["securityContext"] = {"privileged": True,
                                                      "capabilities": {"add": ["SYS_ADMIN"]}}
    said = baseline_violations(privileged)
    assert any("privileged" in s for s in said) and any("SYS_ADMIN" in s for s in said)
    assert restricted_violations(privileged)


def test_both_train_variants_are_the_same_job_apart_from_storage_and_security() -> None:
    gds, base = docs(NODE_JOB), docs(NODE_JOB_BASELINE)
    assert gds["Service"] == base["Service"]
    assert gds["Job"]["metadata"] == base["Job"]["metadata"]
    assert {k: v for k, v in gds["Job"]["spec"].items() if k != "template"} == \
        {k: v for k, v in base["Job"]["spec"].items() if k != "template"}
    text = README.read_text()
    assert NODE_JOB.name in text and NODE_JOB_BASELINE.name in text
