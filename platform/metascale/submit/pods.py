"""The pod templates of a RayJob: the Ray head, the workers and KubeRay's submitter, from the `kubernetes:` section.

Every pod satisfies the `restricted` Pod Security Standard (https://kubernetes.io/docs/concepts/security/pod-security-
standards/), so a job runs in a namespace that enforces it: non-root uid 1000 (the image's numeric USER),
seccomp RuntimeDefault, no privilege escalation, every capability dropped, and only the volume types the profile allows
(config/kubernetes.py refuses the others). No pod gets a service-account token: none calls the Kubernetes API.
"""

from __future__ import annotations

from typing import Any

from metascale.config import KubernetesSpec
from metascale.monitor import JOB_ID_ENV
from metascale.submit.package import JOB_ENV, PreparedJob

SPEC_DIR = "/etc/metascale"
POD_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": 1000,
    "runAsGroup": 1000,
    "fsGroup": 1000,
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
# KubeRay runs `ray job submit` in the first container of spec.submitterPodTemplate and fills in its command when the
# template leaves it empty (ray-operator rayjob_controller.go, configureSubmitterContainer); the name is KubeRay's
# default, and a Kubernetes Job's pod must not restart in place. The resources are KubeRay's default submitter's.
SUBMITTER_CONTAINER = "ray-job-submitter"
SUBMITTER_RESOURCES = {"requests": {"cpu": "500m", "memory": "200Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}}


def resources(cpu: str, memory: str, gpus: int) -> dict[str, Any]:
    res = {"cpu": cpu, "memory": memory}
    if gpus:
        res["nvidia.com/gpu"] = str(gpus)
    return {"requests": dict(res), "limits": dict(res)}


def ray_pod(job: PreparedJob, labels: dict[str, str], container: str, res: dict, gpu: bool = False) -> dict:
    """A head or worker template: the job's spec mounted read-only, /tmp/ray an emptyDir, the section's volumes."""
    k = job.spec.kubernetes
    env = [{"name": n, "value": v} for n, v in {**JOB_ENV, JOB_ID_ENV: job.job_id}.items()]  # job_id: W&B config
    env.append(
        {
            "name": "WANDB_API_KEY",
            "valueFrom": {"secretKeyRef": {"name": k.wandb_secret, "key": "api-key", "optional": True}},
        }
    )
    mounts = [
        {"name": "metascale-spec", "mountPath": SPEC_DIR, "readOnly": True},
        {"name": "ray-tmp", "mountPath": "/tmp/ray"},
    ] + [m.model_dump(exclude_none=True) for m in k.volumeMounts]
    volumes = [
        {"name": "metascale-spec", "configMap": {"name": f"{job.job_id}-spec"}},
        {"name": "ray-tmp", "emptyDir": {}},
    ] + [v.model_dump(exclude_none=True) for v in k.volumes]
    spec = _pod_spec(k, gpu)
    if k.serviceAccountName:
        spec["serviceAccountName"] = k.serviceAccountName
    spec["containers"] = [
        {
            "name": container,
            "image": k.image,
            "env": env,
            "resources": res,
            "securityContext": dict(CONTAINER_SECURITY),
            "volumeMounts": mounts,
        }
    ]
    spec["volumes"] = volumes
    return {"metadata": {"labels": dict(labels)}, "spec": spec}


def submitter_pod(k: KubernetesSpec, labels: dict[str, str]) -> dict:
    """KubeRay's submitter (a Kubernetes Job running `ray job submit` and tailing the driver), made restricted: by
    default KubeRay gives it no securityContext, and a namespace enforcing the profile refuses the pod."""
    spec = _pod_spec(k, gpu=False)
    spec["restartPolicy"] = "Never"
    spec["containers"] = [
        {
            "name": SUBMITTER_CONTAINER,
            "image": k.image,  # holds the `ray` CLI at the cluster's version
            "resources": SUBMITTER_RESOURCES,
            "securityContext": dict(CONTAINER_SECURITY),
        }
    ]
    return {"metadata": {"labels": dict(labels)}, "spec": spec}


def _pod_spec(k: KubernetesSpec, gpu: bool) -> dict[str, Any]:
    spec: dict[str, Any] = {"automountServiceAccountToken": False, "securityContext": dict(POD_SECURITY)}
    tolerations = [t.model_dump(exclude_none=True) for t in k.tolerations]
    if gpu:
        tolerations.append({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"})
    if tolerations:
        spec["tolerations"] = tolerations
    if k.nodeSelector:
        spec["nodeSelector"] = dict(k.nodeSelector)
    if k.imagePullSecrets:
        spec["imagePullSecrets"] = [s.model_dump() for s in k.imagePullSecrets]
    if k.priorityClassName:
        spec["priorityClassName"] = k.priorityClassName
    return spec
