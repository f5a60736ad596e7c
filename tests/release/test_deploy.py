"""The deployment files, validated offline: every Kubernetes manifest against the Kubernetes JSON schemas
of a current release (kubernetes-validate), the agent-sandbox kinds against the schemas this project
ships (deploy/kubernetes/schemas), the Pod specs they embed against Kubernetes' own, and the hardening
each pod must have."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

DEPLOY = Path(__file__).parents[2] / "deploy" / "kubernetes"
KUBERNETES = "1.37.0"
AGENT_SANDBOX = "extensions.agents.x-k8s.io/v1alpha1"
SCHEMAS = json.loads((DEPLOY / "schemas" / "agent-sandbox.json").read_text())
MANIFESTS = sorted(p for p in DEPLOY.rglob("*.yaml") if p.name != "kustomization.yaml")


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def validate(doc: dict[str, Any]) -> None:
    """Raise if ``doc`` is not a valid object of its kind (strict: no unknown fields)."""
    if doc["apiVersion"] != AGENT_SANDBOX:
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)
        return
    jsonschema.validate(doc, {**SCHEMAS, "$ref": f"#/$defs/{doc['kind']}"})
    spec = doc["spec"]
    if "podTemplate" in spec:
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "check"}, "spec": spec["podTemplate"]["spec"]}
        kubernetes_validate.validate(pod, KUBERNETES, strict=True)
    if "networkPolicy" in spec:
        policy = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "check"},
                  "spec": {"podSelector": {}, **spec["networkPolicy"]}}  # fmt: skip
        kubernetes_validate.validate(policy, KUBERNETES, strict=True)


@pytest.mark.parametrize("path", MANIFESTS, ids=[str(p.relative_to(DEPLOY)) for p in MANIFESTS])
def test_every_manifest_is_valid_for_its_kind(path: Path) -> None:
    for doc in documents(path):
        validate(doc)


def test_the_validation_rejects_what_a_cluster_would() -> None:
    deployment = documents(DEPLOY / "base" / "deployment.yaml")[0]
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFileSystem"] = True  # typo
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(broken)
    template = documents(DEPLOY / "sandbox" / "sandbox-template.yaml")[0]
    broken = copy.deepcopy(template)
    broken["spec"]["networkPolicyManagement"] = "Sometimes"
    with pytest.raises(jsonschema.ValidationError):
        validate(broken)
    broken = copy.deepcopy(template)
    broken["spec"]["podTemplate"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "http"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(broken)


def pod_specs() -> list[tuple[str, dict[str, Any]]]:
    deployment = documents(DEPLOY / "base" / "deployment.yaml")[0]
    template = documents(DEPLOY / "sandbox" / "sandbox-template.yaml")[0]
    return [
        ("deployment", deployment["spec"]["template"]["spec"]),
        ("sandbox", template["spec"]["podTemplate"]["spec"]),
    ]


@pytest.mark.parametrize(("where", "pod"), pod_specs(), ids=["deployment", "sandbox-template"])
def test_each_pod_runs_hardened_with_probes_and_limits(where: str, pod: dict[str, Any]) -> None:
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    [container] = pod["containers"]
    context = container["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    assert {"requests", "limits"} <= set(container["resources"])
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    env = {item["name"]: item["value"] for item in container["env"]}
    mounts = {mount["mountPath"]: mount for mount in container["volumeMounts"]}
    assert env["PROCESS_AUTH_TOKENS_FILE"].startswith(next(p for p in mounts if p.startswith("/run/secrets")))
    assert {"/workspace", "/tmp"} <= set(mounts)  # the only writable places under a read-only root
    secret = next(v for v in pod["volumes"] if "secret" in v)["secret"]
    assert secret["defaultMode"] == 0o440  # what the server accepts for a tokens file


@pytest.mark.parametrize("kustomization", sorted(DEPLOY.rglob("kustomization.yaml")), ids=lambda p: p.parent.name)
def test_each_kustomization_names_files_that_exist_and_the_secret_its_pods_mount(kustomization: Path) -> None:
    spec = yaml.safe_load(kustomization.read_text())
    for resource in spec["resources"]:
        assert (kustomization.parent / resource).is_file(), resource
    [generated] = spec["secretGenerator"]
    mounted = {
        volume["secret"]["secretName"]
        for resource in spec["resources"]
        for doc in documents(kustomization.parent / resource)
        for volume in _volumes(doc)
        if "secret" in volume
    }
    assert mounted == {generated["name"]}


def _volumes(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if doc["kind"] == "Deployment":
        return list(doc["spec"]["template"]["spec"].get("volumes", []))
    if doc["kind"] == "SandboxTemplate":
        return list(doc["spec"]["podTemplate"]["spec"].get("volumes", []))
    return []
