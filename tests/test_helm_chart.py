"""The Helm chart: `helm lint --strict` and `helm template` over every values file in helm/ci/ (one of them in the
layout of KubeRay's own ray-cluster chart); every rendered object validates against Kubernetes' schemas
(kubernetes-validate, offline) and, for ray.io kinds, KubeRay's CRD schema with unknown fields rejected (those tests
take the kuberay_crds fixture: they skip where no copy of the CRDs is found); plus the rules no schema holds, and the
values honoured in the output. helm comes from scripts/install-helm.sh (scripts/test.sh runs it).
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
VALUES = {"defaults": []} | {p.name.removesuffix("-values.yaml"): [p] for p in sorted((CHART / "ci").glob("*.yaml"))}
KINDS = {"RayCluster", "ServiceAccount", "Role", "RoleBinding"}


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


def test_the_ci_values_files_include_kuberay_layout_and_persistence():
    assert {"cpu", "gpu", "autoscaling", "kuberay-layout", "kuberay-v1.7.0", "persistence"} <= set(VALUES)


@pytest.mark.usefixtures("kuberay_crds")
@pytest.mark.parametrize("name", list(VALUES))
def test_every_object_validates(rendered, name):
    objs = rendered[name]
    assert {o["kind"] for o in objs} == KINDS | ({"PersistentVolumeClaim"} if name == "persistence" else set())
    for obj in objs:
        assert schema_errors(obj) == [], (obj["kind"], schema_errors(obj))
        assert rule_violations(obj) == [], (obj["kind"], rule_violations(obj))
    for pod in _pods(_cluster(objs)):
        assert pod_problems(pod) == []


def pod_problems(pod: dict) -> list[str]:
    """What the API server refuses in a pod and no schema holds: names used twice, a mount of no volume, two mounts
    at one path (e.g. a group's own /tmp/ray volume next to the chart's)."""
    problems = []
    containers = pod.get("initContainers", []) + pod["containers"]
    volumes = [v["name"] for v in pod.get("volumes", [])]
    for what, names in (("container", [c["name"] for c in containers]), ("volume", volumes)):
        problems += [f"{what} {n} twice" for n in sorted(set(names)) if names.count(n) > 1]
    for c in containers:
        paths = [m["mountPath"] for m in c.get("volumeMounts", [])]
        problems += [f"{c['name']}: two mounts at {p}" for p in sorted(set(paths)) if paths.count(p) > 1]
        problems += [
            f"{c['name']}: no volume {m['name']}" for m in c.get("volumeMounts", []) if m["name"] not in volumes
        ]
    return problems


def _cluster(objs: list[dict]) -> dict:
    return next(o for o in objs if o["kind"] == "RayCluster")


def _pods(cluster: dict) -> list[dict]:
    spec = cluster["spec"]
    return [t["spec"] for t in [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]]


def _containers(cluster: dict) -> list[dict]:
    return [c for p in _pods(cluster) for c in p["containers"]]


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
    assert (
        groups["autoscaling"]["cpu-workers"]["minReplicas"],
        groups["autoscaling"]["cpu-workers"]["maxReplicas"],
    ) == (0, 8)
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
            assert env and all(
                e["valueFrom"]["secretKeyRef"] == {"name": "metascale-wandb", "key": "api-key"} for e in env
            )
            assert all("value" not in e for e in env)
        else:
            assert env == []
    result = run_helm("template", "ms", str(CHART), "--set", "wandb.apiKey=abc123")
    assert result.returncode != 0 and "apiKey is not allowed" in result.stderr


def test_submitter_rbac_is_least_privilege(rendered):
    objs = rendered["defaults"]
    role = next(o for o in objs if o["kind"] == "Role")
    granted = {
        (g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]
    }
    assert granted == {
        ("ray.io", "rayjobs", "create"),
        ("ray.io", "rayjobs", "get"),
        ("ray.io", "rayjobs", "list"),
        ("ray.io", "rayjobs", "patch"),
        ("ray.io", "rayjobs", "delete"),
        ("", "configmaps", "create"),
        ("", "pods", "list"),
        ("", "pods/log", "get"),
    }
    binding = next(o for o in objs if o["kind"] == "RoleBinding")
    assert binding["roleRef"]["kind"] == "Role"  # namespaced, never a ClusterRole
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "ms-metascale-submitter", "namespace": "ml"}]


@pytest.mark.parametrize(
    "sets, message",
    [
        (["worker.replicas=3"], "worker group cpu-workers: need minReplicas (1) <= replicas (3) <= maxReplicas (1)"),
        (
            [
                "additionalWorkerGroups.gpu-workers.disabled=false",
                "additionalWorkerGroups.gpu-workers.resources.requests.nvidia\\.com/gpu=2",
            ],
            "worker group gpu-workers: nvidia.com/gpu requests (2) must equal limits (1)",
        ),
        (["worker.replikas=3"], "Additional property replikas is not allowed"),
        (["common.podSecurityContext.runAsNonRoot=false"], "runAsNonRoot"),
        (["common.podSecurityContext.runAsNonRoot=null"], "common.podSecurityContext: runAsNonRoot is required"),
        (["image.repository=null"], "image: repository is required"),
        (["service.type=External"], "service.type"),
    ],
)
def test_bad_values_fail_with_a_clear_message(sets, message):
    assert_refused([], sets, message)


@pytest.mark.parametrize(
    "sets, message",
    [
        # Typos in KubeRay's layout are still typos; its security keys cannot undo the chart's.
        (["head.sidecarContainer[0].name=x"], "head: Additional property sidecarContainer is not allowed"),
        (
            ["additionalWorkerGroups.gpuGroup.serviceAcountName=x"],
            "additionalWorkerGroups.gpuGroup: Additional property serviceAcountName is not allowed",
        ),
        (["head.autoscalerOptions.idleTimeout=30"], "Additional property idleTimeout is not allowed"),
        (["worker.podSecurityContext.runAsNonRoot=false"], "worker.podSecurityContext.runAsNonRoot"),
        (
            ["head.sidecarContainers[0].name=x", "head.sidecarContainers[0].securityContext.privileged=true"],
            "head.sidecarContainers.0.securityContext.privileged",
        ),
        (["gcsFaultTolerance.redisPassword.value=hunter2"], "Additional property value is not allowed"),
        (["gcsFaultTolerance.redisAddress="], "gcsFaultTolerance.enabled needs gcsFaultTolerance.redisAddress"),
        (
            ["additionalWorkerGroups.cpu-group.replicas=1", "additionalWorkerGroups.cpu-group.resources.limits.cpu=1"],
            "worker group cpu-group: the name is used twice",
        ),
        (
            [
                "additionalWorkerGroups.new.replicas=2",
                "additionalWorkerGroups.new.minReplicas=3",
                "additionalWorkerGroups.new.resources.limits.cpu=1",
            ],
            "worker group new: need minReplicas (3) <= replicas (2) <= maxReplicas (2)",
        ),  # maxReplicas: replicas
        (["persistence.mountPath=data"], "persistence.mountPath"),
    ],
)
def test_bad_kuberay_layout_values_fail_with_a_clear_message(sets, message):
    assert_refused([CHART / "ci" / "kuberay-layout-values.yaml"], sets, message)


def assert_refused(files: list[Path], sets: list[str], message: str) -> None:
    args = ["template", "ms", str(CHART)]
    for f in files:
        args += ["-f", str(f)]
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
    bad["spec"]["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]["resources"]["requests"][
        "nvidia.com/gpu"
    ] = "2"
    cases.append((bad, "requests must equal limits"))
    bad = copy.deepcopy(cluster)
    bad["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"].append(
        {"name": "WANDB_API_KEY", "value": "k"}
    )
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


def test_lint_strict_still_rejects_a_typo_in_kuberay_layout():
    args = ["lint", "--strict", str(CHART), "-f", str(CHART / "ci" / "kuberay-layout-values.yaml")]
    assert run_helm(*args).returncode == 0
    result = run_helm(*args, "--set", "worker.tolerashuns[0].key=x")
    assert result.returncode != 0 and "Additional property tolerashuns is not allowed" in result.stdout, result.stdout


def test_pod_checks_catch_what_they_guard(rendered):
    """pod_problems must fail a pod with each broken rule (else test_every_object_validates proves nothing there)."""
    head = _pods(_cluster(rendered["kuberay-layout"]))[0]
    assert pod_problems(head) == []
    bad = copy.deepcopy(head)
    bad["containers"][0]["volumeMounts"].append({"name": "ray-tmp", "mountPath": "/tmp/ray"})
    assert pod_problems(bad) == ["ray-head: two mounts at /tmp/ray", "ray-head: no volume ray-tmp"]
    bad = copy.deepcopy(head)
    bad["containers"].append(copy.deepcopy(bad["containers"][1]))
    bad["volumes"].append(bad["volumes"][0])
    assert pod_problems(bad) == ["container fluentbit twice", "volume log-volume twice"]


def test_kuberay_layout_values_are_honoured(rendered):
    values = yaml.safe_load((CHART / "ci" / "kuberay-layout-values.yaml").read_text())
    cluster = _cluster(rendered["kuberay-layout"])
    spec = cluster["spec"]
    assert cluster["metadata"]["name"] == "ms-metascale-ray"  # nameOverride
    assert cluster["metadata"]["annotations"] == values["annotations"]
    assert spec["autoscalerOptions"] == values["head"]["autoscalerOptions"]
    assert spec["gcsFaultToleranceOptions"]["redisPassword"] == values["gcsFaultTolerance"]["redisPassword"]
    head_group = spec["headGroupSpec"]
    assert head_group["headService"] == values["head"]["headService"]
    # Whole numbers stay whole: Helm reads them as floats, and KubeRay's chart would print 1e+09.
    assert head_group["rayStartParams"] == {
        "dashboard-host": "0.0.0.0",
        "num-cpus": "0",
        "object-store-memory": "1000000000",
        "metrics-export-port": "8080",
    }
    head = head_group["template"]["spec"]
    ray, sidecar = head["containers"]
    assert sidecar == values["head"]["sidecarContainers"][0]
    assert head["initContainers"] == values["head"]["initContainers"]
    assert head["serviceAccountName"] == "ray-head" and head["imagePullSecrets"] == [{"name": "registry-credentials"}]
    assert (head["priorityClassName"], head["dnsConfig"]) == ("ml-high", values["head"]["dnsConfig"])
    assert ray["ports"] == values["head"]["ports"] and ray["envFrom"] == values["head"]["envFrom"]
    assert ray["image"] == "registry.example.com/ml/metascale:0.1.0-cpu" and ray["imagePullPolicy"] == "Always"
    env = [e["name"] for e in ray["env"]]
    assert env.index("RAY_DEDUP_LOGS") < env.index("RAY_GRAFANA_HOST")  # common, then the group's
    # Security: the group's keys override common's one by one; non-root is kept.
    assert head["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 1001,
        "runAsGroup": 1001,
        "fsGroup": 1001,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert ray["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True,
    }
    # The group's own /tmp/ray volume replaces the chart's emptyDir.
    assert ray["volumeMounts"] == values["head"]["volumeMounts"] and head["volumes"] == values["head"]["volumes"]

    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert list(groups) == ["cpu-group", "gpuGroup"]  # smallGroup and the chart's gpu-workers are disabled
    cpu = groups["cpu-group"]
    assert (cpu["replicas"], cpu["minReplicas"], cpu["maxReplicas"], cpu["numOfHosts"]) == (2, 1, 6, 1)
    assert cpu["rayStartParams"] == {"num-cpus": "4"}
    cpu_pod = cpu["template"]["spec"]
    assert cpu_pod["serviceAccountName"] == "ray-worker" and cpu_pod["automountServiceAccountToken"] is False
    assert cpu_pod["topologySpreadConstraints"] == values["worker"]["topologySpreadConstraints"]
    assert cpu_pod["securityContext"]["runAsUser"] == 1000 and cpu_pod["securityContext"]["seccompProfile"]
    assert cpu["template"]["metadata"]["annotations"] == values["worker"]["annotations"]
    gpu_pod = groups["gpuGroup"]["template"]["spec"]
    gpu = gpu_pod["containers"][0]
    assert gpu["image"] == "registry.example.com/ml/metascale:0.1.0" and gpu["imagePullPolicy"] == "IfNotPresent"
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1 and gpu_pod["priorityClassName"] == "ml-batch"
    assert [m["mountPath"] for m in gpu["volumeMounts"]] == ["/tmp/ray", "/dev/shm"]  # the chart's /tmp/ray kept


def test_kuberay_own_values_file_is_honoured(rendered):
    """KubeRay's values.yaml, unchanged: its image, its groups and its /tmp/ray volume."""
    spec = _cluster(rendered["kuberay-v1.7.0"])["spec"]
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert list(groups) == ["workergroup"] and (
        groups["workergroup"]["minReplicas"],
        groups["workergroup"]["maxReplicas"],
    ) == (1, 5)
    for pod in _pods(_cluster(rendered["kuberay-v1.7.0"])):
        ray = pod["containers"][0]
        assert ray["image"] == "rayproject/ray:2.52.0"
        assert ray["volumeMounts"] == [{"mountPath": "/tmp/ray", "name": "log-volume"}]
        assert pod["securityContext"]["runAsNonRoot"] is True


def test_persistence_mounts_one_claim_everywhere(rendered):
    objs = rendered["persistence"]
    claim = next(o for o in objs if o["kind"] == "PersistentVolumeClaim")
    assert claim["metadata"]["name"] == "ms-metascale-data"
    assert claim["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}  # survives `helm uninstall`
    assert claim["spec"] == {
        "accessModes": ["ReadWriteMany"],
        "storageClassName": "standard-rwx",
        "resources": {"requests": {"storage": "200Gi"}},
    }
    pods = _pods(_cluster(objs))
    assert len(pods) == 3  # head, cpu-workers, gpu-workers
    for pod in pods:
        assert {"name": "metascale-data", "persistentVolumeClaim": {"claimName": "ms-metascale-data"}} in pod["volumes"]
        assert {"name": "metascale-data", "mountPath": "/mnt/metascale"} in pod["containers"][0]["volumeMounts"]
    existing = render(VALUES["persistence"], "persistence.existingClaim=shared-runs", "persistence.subPath=ms")
    assert {o["kind"] for o in existing} == KINDS  # the claim is the user's: none created
    for pod in _pods(_cluster(existing)):
        assert {"name": "metascale-data", "persistentVolumeClaim": {"claimName": "shared-runs"}} in pod["volumes"]
        assert {"name": "metascale-data", "mountPath": "/mnt/metascale", "subPath": "ms"} in pod["containers"][0][
            "volumeMounts"
        ]
    assert all("metascale-data" not in str(p) for p in _pods(_cluster(rendered["defaults"])))


def test_a_group_without_bounds_stays_at_its_replicas():
    """KubeRay's chart defaults maxReplicas to 2**31-1; here a group grows past replicas only when asked to."""
    objs = render([], "additionalWorkerGroups.new.replicas=2", "additionalWorkerGroups.new.resources.limits.cpu=1")
    new = next(g for g in _cluster(objs)["spec"]["workerGroupSpecs"] if g["groupName"] == "new")
    assert (new["minReplicas"], new["replicas"], new["maxReplicas"]) == (0, 2, 2)
