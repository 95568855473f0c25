"""The Helm chart: `helm lint --strict` and `helm template` over the CI values files; every rendered object validates
against Kubernetes' schemas (kubernetes-validate, offline) and, for ray.io kinds, KubeRay's CRD schema with unknown
fields rejected (those tests take the kuberay_crds fixture: they skip where no copy of the CRDs is found); plus the
rules no schema holds. helm comes from scripts/install-helm.sh (scripts/test.sh runs it).
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from k8s_emulator import REPO, rule_violations, schema_errors

CHART = REPO / "helm"
VALUES = {
    "defaults": [],
    "cpu": [CHART / "ci" / "cpu-values.yaml"],
    "gpu": [CHART / "ci" / "gpu-values.yaml"],
    "autoscaling": [CHART / "ci" / "autoscaling-values.yaml"],
}


def helm() -> str:
    path = REPO / ".venv" / "bin" / "helm"
    found = str(path) if path.exists() else shutil.which("helm")
    assert found, "helm is missing: run scripts/install-helm.sh"
    return found


def run_helm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([helm(), *args], capture_output=True, text=True, timeout=60)


def render(files: list[Path], *sets: str) -> list[dict]:
    args = ["template", "ms", str(CHART), "--namespace", "ml"]
    for f in files:
        args += ["-f", str(f)]
    for s in sets:
        args += ["--set", s]
    result = run_helm(*args)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: render(files) for name, files in VALUES.items()}


@pytest.mark.parametrize("name", list(VALUES))
def test_lint_strict(name):
    args = ["lint", "--strict", str(CHART)]
    for f in VALUES[name]:
        args += ["-f", str(f)]
    result = run_helm(*args)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.usefixtures("kuberay_crds")
@pytest.mark.parametrize("name", list(VALUES))
def test_every_object_validates(rendered, name):
    objs = rendered[name]
    assert {o["kind"] for o in objs} == {"RayCluster", "ServiceAccount", "Role", "RoleBinding"}
    for obj in objs:
        assert schema_errors(obj) == [], (obj["kind"], schema_errors(obj))
        assert rule_violations(obj) == [], (obj["kind"], rule_violations(obj))


def _cluster(objs: list[dict]) -> dict:
    return next(o for o in objs if o["kind"] == "RayCluster")


def _containers(cluster: dict) -> list[dict]:
    spec = cluster["spec"]
    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec.get("workerGroupSpecs", [])]
    return [c for p in pods for c in p["spec"]["containers"]]


def test_values_files_shape_the_cluster(rendered):
    groups = {n: {g["groupName"]: g for g in _cluster(o)["spec"]["workerGroupSpecs"]} for n, o in rendered.items()}
    assert list(groups["defaults"]) == ["cpu-workers"]
    assert groups["cpu"]["cpu-workers"]["replicas"] == 4
    gpu = groups["gpu"]["gpu-workers"]["template"]["spec"]
    assert gpu["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert gpu["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert gpu["tolerations"][0]["key"] == "nvidia.com/gpu"
    auto = _cluster(rendered["autoscaling"])["spec"]
    assert auto["enableInTreeAutoscaling"] is True and auto["autoscalerOptions"]["idleTimeoutSeconds"] == 120
    assert (groups["autoscaling"]["cpu-workers"]["minReplicas"], groups["autoscaling"]["cpu-workers"]["maxReplicas"]) == (0, 8)
    # Only the autoscaler sidecar needs an API token; workers never get one.
    assert auto["headGroupSpec"]["template"]["spec"]["automountServiceAccountToken"] is True
    default = _cluster(rendered["defaults"])["spec"]
    assert default["headGroupSpec"]["template"]["spec"]["automountServiceAccountToken"] is False
    assert default["headGroupSpec"]["serviceType"] == "ClusterIP"


def test_wandb_key_is_referenced_never_inlined(rendered):
    for name, objs in rendered.items():
        assert not [o for o in objs if o["kind"] == "Secret"]
        env = [e for c in _containers(_cluster(objs)) for e in c.get("env", []) if e["name"] == "WANDB_API_KEY"]
        if name == "gpu":  # existingSecret set
            assert env and all(e["valueFrom"]["secretKeyRef"] == {"name": "metascale-wandb", "key": "api-key"} for e in env)
            assert all("value" not in e for e in env)
        else:
            assert env == []
    result = run_helm("template", "ms", str(CHART), "--set", "wandb.apiKey=abc123")
    assert result.returncode != 0 and "apiKey is not allowed" in result.stderr


def test_submitter_rbac_is_least_privilege(rendered):
    objs = rendered["defaults"]
    role = next(o for o in objs if o["kind"] == "Role")
    granted = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    assert granted == {
        ("ray.io", "rayjobs", "create"), ("ray.io", "rayjobs", "get"), ("ray.io", "rayjobs", "list"),
        ("ray.io", "rayjobs", "patch"), ("ray.io", "rayjobs", "delete"), ("", "configmaps", "create"),
        ("", "pods", "list"), ("", "pods/log", "get"),
    }
    binding = next(o for o in objs if o["kind"] == "RoleBinding")
    assert binding["roleRef"]["kind"] == "Role"  # namespaced, never a ClusterRole
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "ms-metascale-submitter", "namespace": "ml"}]


@pytest.mark.parametrize(
    "sets, message",
    [
        (["worker.replicas=3"], "worker group cpu-workers: need minReplicas (1) <= replicas (3) <= maxReplicas (1)"),
        (
            ["additionalWorkerGroups.gpu-workers.disabled=false",
             "additionalWorkerGroups.gpu-workers.resources.requests.nvidia\\.com/gpu=2"],
            "worker group gpu-workers: nvidia.com/gpu requests (2) must equal limits (1)",
        ),
        (["worker.replikas=3"], "Additional property replikas is not allowed"),
        (["common.podSecurityContext.runAsNonRoot=false"], "runAsNonRoot"),
        (["service.type=External"], "service.type"),
    ],
)
def test_bad_values_fail_with_a_clear_message(sets, message):
    args = ["template", "ms", str(CHART)]
    for s in sets:
        args += ["--set", s]
    result = run_helm(*args)
    assert result.returncode != 0 and message in result.stderr, result.stderr


def test_rule_checks_catch_what_they_guard(rendered):
    """The rule checker itself must fail on each broken rule (else the tests above prove nothing)."""
    cluster = _cluster(rendered["gpu"])
    cases = []
    bad = copy.deepcopy(cluster)
    bad["spec"]["workerGroupSpecs"][0]["replicas"] = 9
    cases.append((bad, "minReplicas"))
    bad = copy.deepcopy(cluster)
    bad["spec"]["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]["resources"]["requests"]["nvidia.com/gpu"] = "2"
    cases.append((bad, "requests must equal limits"))
    bad = copy.deepcopy(cluster)
    bad["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"].append({"name": "WANDB_API_KEY", "value": "k"})
    cases.append((bad, "secretKeyRef"))
    bad = copy.deepcopy(cluster)
    del bad["spec"]["headGroupSpec"]["template"]["spec"]["securityContext"]["runAsNonRoot"]
    cases.append((bad, "runAsNonRoot"))
    for obj, needle in cases:
        assert any(needle in p for p in rule_violations(obj)), needle


@pytest.mark.usefixtures("kuberay_crds")
def test_schema_check_catches_an_unknown_field(rendered):
    """As above, for the schema check: KubeRay's schema with unknown fields rejected must catch a typo."""
    cluster = _cluster(rendered["gpu"])
    assert schema_errors(cluster) == []
    typo = copy.deepcopy(cluster)
    typo["spec"]["workerGroupSpecs"][0]["maxReplica"] = 3
    assert any("maxReplica" in e for e in schema_errors(typo))
