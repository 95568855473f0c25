"""The KubeRay objects a submission creates: a RayJob (ray.io/v1) and the ConfigMap carrying its spec.

The RayJob brings up its own RayCluster (head + one worker group sized from spec.cluster and spec.sharding: a pod
per replica, or per rank group holding all its ranks' GPUs; the head, where the driver runs, needs no GPU), runs the
fixed entrypoint `metascale run /etc/metascale/metascale-job.yaml --auto-resume` and tears the cluster down when the
job ends; a failed job is retried up to BACKOFF_LIMIT times and resumes from its checkpoints. Pods run as non-root;
the W&B API key comes from a Secret by reference (optional, so W&B's offline/disabled modes need none).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from metascale.monitor import JOB_ID_ENV
from metascale.submit.package import JOB_ENV, SPEC_FILE, PreparedJob

GROUP, VERSION, PLURAL = "ray.io", "v1", "rayjobs"
SPEC_DIR = "/etc/metascale"
MANAGED_BY = {"app.kubernetes.io/managed-by": "metascale"}
RAY_VERSION = "2.60.0"
# Retries of a failed job (a new RayCluster each): the entrypoint runs with --auto-resume, so a retry continues from
# the newest checkpoint when checkpoint.dir is shared storage (s3://...), and starts over when it was pod-local.
BACKOFF_LIMIT = 2


@dataclass(frozen=True)
class ClusterShape:
    """What the RayJob's own cluster looks like; the defaults suit the image built from deploy/Dockerfile."""

    image: str = "metascale:0.1.0"
    wandb_secret: str = "metascale-wandb"  # a Secret with key `api-key`; referenced, never read by metascale
    ttl_seconds: int = 3600  # how long the finished RayJob stays for `status`/`logs` (its cluster is shut down)
    head_cpus: int = 1
    head_memory: str = "4Gi"
    worker_memory: str = "8Gi"


def labels(job: PreparedJob) -> dict[str, str]:
    return {**MANAGED_BY, "app.kubernetes.io/name": "metascale", "metascale.io/job-id": job.job_id}


def spec_configmap(job: PreparedJob, namespace: str, owner_uid: str | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": f"{job.job_id}-spec", "namespace": namespace, "labels": labels(job)}
    if owner_uid:  # deleted with its RayJob by the garbage collector
        meta["ownerReferences"] = [
            {"apiVersion": f"{GROUP}/{VERSION}", "kind": "RayJob", "name": job.job_id, "uid": owner_uid}
        ]
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {SPEC_FILE: job.spec_yaml}}


def worker_pods(job: PreparedJob) -> tuple[int, int]:
    """(pods, processes a pod hosts). A replica is a pod; a rank group is one pod holding all its ranks (the
    group's STRICT_PACK placement needs them on one node), or with `sharding.span_nodes` a pod per rank."""
    c, s = job.spec.cluster, job.spec.sharding
    if s.engine == "none" or s.span_nodes:
        return c.workers * s.ranks, 1
    return c.workers, s.ranks


def rayjob(job: PreparedJob, namespace: str, shape: ClusterShape = ClusterShape()) -> dict[str, Any]:
    c = job.spec.cluster
    pods, per_pod = worker_pods(job)
    gpus = math.ceil(c.gpus_per_process * per_pod)
    worker_resources = _resources(cpu=f"{c.cpus_per_process * per_pod:g}", memory=shape.worker_memory, gpus=gpus)
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "RayJob",
        "metadata": {
            "name": job.job_id,
            "namespace": namespace,
            "labels": labels(job),
            "annotations": {"metascale.io/job-name": job.spec.name},
        },
        "spec": {
            "entrypoint": job.entrypoint(f"{SPEC_DIR}/{SPEC_FILE}"),
            "submissionMode": "K8sJobMode",
            "backoffLimit": BACKOFF_LIMIT,
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": shape.ttl_seconds,
            "rayClusterSpec": {
                "rayVersion": RAY_VERSION,
                "headGroupSpec": {
                    "rayStartParams": {"num-cpus": "0"},  # the head schedules no meta-workers
                    "template": _pod(job, shape, "ray-head", _resources(str(shape.head_cpus), shape.head_memory, 0)),
                },
                "workerGroupSpecs": [
                    {
                        "groupName": "gpu-workers" if gpus else "cpu-workers",
                        "replicas": pods,
                        "minReplicas": pods,
                        "maxReplicas": pods,
                        "rayStartParams": {},
                        "template": _pod(job, shape, "ray-worker", worker_resources, gpu=gpus > 0),
                    }
                ],
            },
        },
    }


def _resources(cpu: str, memory: str, gpus: int) -> dict[str, Any]:
    res = {"cpu": cpu, "memory": memory}
    if gpus:
        res["nvidia.com/gpu"] = str(gpus)
    return {"requests": dict(res), "limits": dict(res)}


def _pod(job: PreparedJob, shape: ClusterShape, container: str, resources: dict, gpu: bool = False) -> dict:
    env = [{"name": k, "value": v} for k, v in {**JOB_ENV, JOB_ID_ENV: job.job_id}.items()]  # job_id: W&B config
    env.append(
        {
            "name": "WANDB_API_KEY",
            "valueFrom": {"secretKeyRef": {"name": shape.wandb_secret, "key": "api-key", "optional": True}},
        }
    )
    spec: dict[str, Any] = {
        "automountServiceAccountToken": False,  # Ray pods never call the Kubernetes API
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000},
        "containers": [
            {
                "name": container,
                "image": shape.image,
                "env": env,
                "resources": resources,
                "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
                "volumeMounts": [
                    {"name": "metascale-spec", "mountPath": SPEC_DIR, "readOnly": True},
                    {"name": "ray-tmp", "mountPath": "/tmp/ray"},
                ],
            }
        ],
        "volumes": [
            {"name": "metascale-spec", "configMap": {"name": f"{job.job_id}-spec"}},
            {"name": "ray-tmp", "emptyDir": {}},
        ],
    }
    if gpu:
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {"metadata": {"labels": labels(job)}, "spec": spec}
