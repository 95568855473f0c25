"""Every file in deploy/ checked for what it is: Kubernetes manifests against Kubernetes' and KubeRay's schemas (unknown
fields rejected) and the rules beyond them, the kustomization built with `kubectl kustomize`, the job spec with
metascale's own loader, the Dockerfile and its pins against pyproject.toml. Tests that validate against KubeRay's
schema take the kuberay_crds fixture (they skip where no copy of the CRDs is found).
"""

from __future__ import annotations

import re
import shlex
import subprocess
import tomllib

import pytest
import yaml
from k8s_emulator import REPO, pod_templates, rule_violations, schema_errors
from pod_security import restricted_violations

from metascale.config import load_spec, parse_spec
from metascale.submit.package import prepare
from metascale.submit.rayjob import SPEC_DIR, rayjob

DEPLOY = REPO / "deploy"
CHECKED = {"rayjob.yaml", "kustomization.yaml", "job.yaml", "constraints.txt", "Dockerfile", "image"}


def test_every_file_in_deploy_is_checked():
    assert {p.name for p in DEPLOY.iterdir()} == CHECKED


@pytest.mark.usefixtures("kuberay_crds")
def test_example_rayjob_validates_and_keeps_the_rules():
    obj = yaml.safe_load((DEPLOY / "rayjob.yaml").read_text())
    assert schema_errors(obj) == [] and rule_violations(obj) == []
    pods = pod_templates(obj)
    assert len(pods) == 3 and [restricted_violations(p) for _, p in pods] == [[], [], []]
    assert shlex.split(obj["spec"]["entrypoint"]) == [
        "metascale",
        "run",
        f"{SPEC_DIR}/metascale-job.yaml",
        "--auto-resume",
    ]
    assert obj["spec"]["backoffLimit"] == 2  # a retry resumes from the job's checkpoints


@pytest.mark.usefixtures("kuberay_crds")
def test_kustomization_builds_valid_objects():
    out = subprocess.run(
        [str(REPO / ".venv" / "bin" / "kubectl"), "kustomize", str(DEPLOY)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    objs = {o["kind"]: o for o in yaml.safe_load_all(out.stdout) if o}
    assert set(objs) == {"RayJob", "ConfigMap"}
    for obj in objs.values():
        assert schema_errors(obj) == [] and rule_violations(obj) == []
    cm = objs["ConfigMap"]
    volumes = objs["RayJob"]["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["volumes"]
    assert {"name": "metascale-spec", "configMap": {"name": cm["metadata"]["name"]}} in volumes
    assert parse_spec(yaml.safe_load(cm["data"]["metascale-job.yaml"])).cluster.address == "auto"
    load_spec(DEPLOY / "job.yaml")


@pytest.mark.usefixtures("kuberay_crds")
def test_rayjob_from_submit_keeps_the_rules():
    obj = rayjob(prepare(DEPLOY / "job.yaml", ["cluster.gpus_per_process=1"]), "ml")
    assert schema_errors(obj) == [] and rule_violations(obj) == []
    worker = obj["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert worker["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    broken = dict(obj, spec={**obj["spec"], "shutdownAfterJobFinishes": False})
    assert rule_violations(broken) == ["RayJob: ttlSecondsAfterFinished needs shutdownAfterJobFinishes: true"]


def test_image_pins_match_the_project():
    pins = [ln for ln in (DEPLOY / "constraints.txt").read_text().splitlines() if ln and not ln.startswith("#")]
    assert pins and all(re.fullmatch(r"[A-Za-z0-9._-]+(\[[\w,]+\])?==[\w.+!-]+", p) for p in pins), pins
    constrained = {p.split("==")[0].lower().replace("_", "-"): p.split("==")[1] for p in pins}
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        m = re.fullmatch(r"([A-Za-z0-9._-]+)(?:\[[\w,]+\])?==(.+)", dep)
        if m and m[1] != "torch":
            assert constrained.get(m[1].lower().replace("_", "-")) == m[2], (
                f"{dep}: regenerate deploy/constraints.txt (see its header)"
            )
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    torch = next(d for d in deps if d.startswith("torch=="))
    assert f"ARG TORCH_VERSION={torch.split('==')[1]}" in dockerfile
    base = re.search(r"^ARG BASE=(\S+)", dockerfile, re.M)[1]
    assert ":" in base and not base.endswith(":latest")
    assert re.findall(r"^FROM (\S+)", dockerfile, re.M) == [
        "${BASE}",
        "${BASE}",
    ]  # two stages, one base (both variants)
    assert re.search(r"^USER 1000:1000$", dockerfile, re.M) and "--constraint /tmp/constraints.txt" in dockerfile
    assert "--no-index" in dockerfile  # the wheelhouse only: nothing is fetched inside the build
    copied = set(re.findall(r"^COPY (image/\S+)", dockerfile, re.M))
    assert copied == {f"image/{p.name}" for p in (DEPLOY / "image").iterdir()}  # deploy/image/: each file used
