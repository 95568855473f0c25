"""The RayJob's pods against the restricted Pod Security Standard (and that checker against broken pods), and which
checkpoint and W&B paths `submit --to k8s://` counts as lost with the pods."""

from __future__ import annotations

import copy

import pytest
from k8s_emulator import pod_templates
from pod_security import restricted_violations

from metascale.config import parse_spec
from metascale.errors import OptInError
from metascale.submit.ephemeral import check_persistent, ephemeral_paths
from metascale.submit.package import prepare
from metascale.submit.rayjob import rayjob

PVC = {
    "volumes": [{"name": "runs", "persistentVolumeClaim": {"claimName": "runs"}}, {"name": "tmp", "emptyDir": {}}],
    "volumeMounts": [{"name": "runs", "mountPath": "/mnt/runs"}, {"name": "tmp", "mountPath": "/scratch"}],
}


@pytest.mark.parametrize("kw", [{}, {"queue": "q"}, {"cluster": "ms-metascale"}], ids=["own", "queue", "cluster"])
def test_every_pod_is_restricted(kw):
    obj = rayjob(prepare("jobs/vit-large-zero3.yaml"), "ml", **kw)
    pods = pod_templates(obj)
    assert pods and pods[0][0] == "submitterPodTemplate"
    assert [(w, restricted_violations(p)) for w, p in pods] == [(w, []) for w, _ in pods]


BREAKS = [
    (lambda p: p.update(hostNetwork=True), "hostNetwork"),
    (lambda p: p.update(hostPID=True), "hostPID"),
    (lambda p: p["volumes"].append({"name": "h", "hostPath": {"path": "/"}}), "type hostPath not allowed"),
    (lambda p: p["containers"][0]["securityContext"].update(privileged=True), "privileged"),
    (lambda p: p["containers"][0]["securityContext"].update(allowPrivilegeEscalation=True), "allowPrivilegeEscalation"),
    (lambda p: p["containers"][0]["securityContext"].pop("capabilities"), "drop must include ALL"),
    (
        lambda p: p["containers"][0]["securityContext"].update(capabilities={"drop": ["ALL"], "add": ["SYS_ADMIN"]}),
        "only NET_BIND_SERVICE",
    ),
    (lambda p: p["securityContext"].pop("runAsNonRoot"), "runAsNonRoot must be true"),
    (lambda p: p["containers"][0]["securityContext"].update(runAsUser=0), "runAsUser must not be 0"),
    (lambda p: p["securityContext"].pop("seccompProfile"), "seccompProfile.type must be RuntimeDefault"),
    (lambda p: p["securityContext"].update(seccompProfile={"type": "Unconfined"}), "must not be Unconfined"),
    (lambda p: p["containers"][0].update(ports=[{"containerPort": 80, "hostPort": 80}]), "hostPort"),
    (lambda p: p["containers"][0]["securityContext"].update(procMount="Unmasked"), "procMount"),
    (lambda p: p["securityContext"].update(sysctls=[{"name": "kernel.msgmax", "value": "1"}]), "kernel.msgmax"),
    (lambda p: p["securityContext"].update(seLinuxOptions={"type": "spc_t"}), "seLinuxOptions"),
]


@pytest.mark.parametrize("brk, message", BREAKS, ids=[m for _, m in BREAKS])
def test_the_restricted_checker_catches_each_rule(brk, message):
    for where, pod in pod_templates(rayjob(prepare("jobs/vit-large-zero3.yaml"), "ml")):
        pod = copy.deepcopy(pod)
        pod.setdefault("volumes", [])
        brk(pod)
        assert any(message in p for p in restricted_violations(pod)), (where, restricted_violations(pod))


def _spec(checkpoint: str, wandb_mode: str = "disabled", wandb_dir: str = "runs/{name}", **kubernetes):
    return parse_spec(
        {
            "name": "j",
            "checkpoint": {"dir": checkpoint},
            "logging": {"wandb": {"mode": wandb_mode, "dir": wandb_dir}},
            "kubernetes": kubernetes,
        }
    )


@pytest.mark.parametrize(
    "spec, lost",
    [
        (_spec("s3://bucket/{name}"), []),
        (_spec("gs://bucket/{name}", "online"), []),  # online W&B keeps nothing that matters in its dir
        (_spec("runs/{name}/checkpoints"), ["checkpoint.dir (runs/j/checkpoints)"]),
        (_spec("/mnt/runs/{name}", **PVC), []),
        (_spec("file:///mnt/runs/{name}", **PVC), []),
        (_spec("/mnt/runs/../etc/{name}", **PVC), ["checkpoint.dir (/mnt/runs/../etc/j)"]),
        (_spec("/mnt/runsx/{name}", **PVC), ["checkpoint.dir (/mnt/runsx/j)"]),
        (_spec("/scratch/{name}", **PVC), ["checkpoint.dir (/scratch/j)"]),  # an emptyDir dies with the pod
        (_spec("memory://x"), ["checkpoint.dir (memory://x)"]),
        (_spec("s3://b/{name}", "offline"), ["logging.wandb.dir (runs/j)"]),
        (_spec("s3://b/{name}", "auto", "/mnt/runs/{name}", **PVC), []),
    ],
)
def test_what_counts_as_lost_with_the_pods(spec, lost):
    assert ephemeral_paths(spec) == lost


def test_read_only_mounts_and_existing_clusters_do_not_count():
    ro = {**PVC, "volumeMounts": [{"name": "runs", "mountPath": "/mnt/runs", "readOnly": True}]}
    assert ephemeral_paths(_spec("/mnt/runs/{name}", **ro)) == ["checkpoint.dir (/mnt/runs/j)"]
    # on an existing RayCluster the section's volumes are not its pods': only URLs last
    assert ephemeral_paths(_spec("/mnt/runs/{name}", **PVC), existing_cluster=True) == ["checkpoint.dir (/mnt/runs/j)"]
    with pytest.raises(
        OptInError,
        match=r"^x.yaml: checkpoint.dir .* use an s3:// \(or other object-store\) URL, or "
        r"pass --allow-ephemeral$",
    ):
        check_persistent(_spec("/mnt/runs/{name}", **PVC), existing_cluster=True, source="x.yaml")
    check_persistent(_spec("s3://b/{name}"), existing_cluster=True, source="x.yaml")
