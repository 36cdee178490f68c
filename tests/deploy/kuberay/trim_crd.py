"""Make the small copies of KubeRay's RayJob CRD schema that tests/deploy checks against.

KubeRay's CRD files embed a full Kubernetes PodTemplateSpec schema for every pod template
(1.3 MB per version). The tests validate pod templates with kubernetes-validate instead, so
each embedded PodTemplateSpec (a ``template`` with ``metadata`` and ``spec``) and Kubernetes
ServiceSpec is replaced here by an open object; everything KubeRay defines itself is kept.

From a checkout of github.com/ray-project/kuberay:
    for v in v1.5.1 v1.6.0 v1.7.0; do
      git -C kuberay show $v:ray-operator/config/crd/bases/ray.io_rayjobs.yaml |
        python tests/deploy/kuberay/trim_crd.py > tests/deploy/kuberay/rayjob-$v.json
    done
"""

from __future__ import annotations

import json
import sys
from typing import Any

import yaml

OPEN = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
# Kubernetes types KubeRay embeds whole; their own schemas come from kubernetes-validate.
EMBEDDED = {"template", "headService", "submitterPodTemplate"}


def trim(node: Any, key: str = "") -> Any:
    """``node`` with every embedded Kubernetes object schema replaced by an open object."""
    if isinstance(node, dict):
        props = node.get("properties") or {}
        if key in EMBEDDED and {"metadata", "spec"} <= props.keys():
            return {**OPEN, "description": f"Kubernetes object ({key}), checked elsewhere"}
        return {k: trim(v, k) for k, v in node.items()}
    if isinstance(node, list):
        return [trim(v) for v in node]
    return node


def main() -> None:
    crd = yaml.safe_load(sys.stdin)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = trim(version["schema"]["openAPIV3Schema"])
    json.dump(schema, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
