"""The KubeRay objects a submission creates: a RayJob (ray.io/v1) and the ConfigMap carrying its spec.

By default the RayJob brings up its own RayCluster (head + one worker group sized from spec.cluster and
spec.sharding; the head, where the driver runs, needs no GPU; pods from spec.kubernetes, see pods.py), runs the fixed
entrypoint `metascale run /etc/metascale/metascale-job.yaml --auto-resume` and tears the cluster down when the job
ends; a failed job is retried up to kubernetes.backoffLimit times and resumes from its checkpoints. Its Ray job ID
(spec.jobId) is metascale's job ID, so `ray job status ID` on the cluster names the same job.

`cluster=NAME` runs it on an existing RayCluster instead (spec.clusterSelector `ray.io/cluster: NAME`, as in KubeRay's
ray-job.use-existing-raycluster.yaml sample): KubeRay then refuses backoffLimit > 0 and suspend, and never deletes
that cluster, so shutdownAfterJobFinishes and its TTL are left out. `queue=NAME` hands the RayJob to Kueue (label
`kueue.x-k8s.io/queue-name`, created suspended: Kueue unsuspends it once admitted), as in Kueue's "Run A RayJob".
"""

from __future__ import annotations

import math
from typing import Any

from metascale.config import pod_processes
from metascale.submit.package import SPEC_FILE, PreparedJob
from metascale.submit.pods import SPEC_DIR, ray_pod, resources, submitter_pod

GROUP, VERSION, PLURAL = "ray.io", "v1", "rayjobs"
MANAGED_BY = {"app.kubernetes.io/managed-by": "metascale"}
RAY_VERSION = "2.60.0"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
CLUSTER_KEY = "ray.io/cluster"  # KubeRay's RayJobClusterSelectorKey
JOB_NAME_ANNOTATION = "metascale.io/job-name"

__all__ = ["GROUP", "MANAGED_BY", "PLURAL", "SPEC_DIR", "VERSION", "labels", "rayjob", "spec_configmap"]


def labels(job: PreparedJob) -> dict[str, str]:
    return {**MANAGED_BY, "app.kubernetes.io/name": "metascale", "metascale.io/job-id": job.job_id}


def spec_configmap(job: PreparedJob, namespace: str, owner_uid: str | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": f"{job.job_id}-spec", "namespace": namespace, "labels": labels(job)}
    if owner_uid:  # deleted with its RayJob by the garbage collector
        meta["ownerReferences"] = [
            {"apiVersion": f"{GROUP}/{VERSION}", "kind": "RayJob", "name": job.job_id, "uid": owner_uid}
        ]
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {SPEC_FILE: job.spec_yaml}}


def rayjob(job: PreparedJob, namespace: str, queue: str | None = None, cluster: str | None = None) -> dict[str, Any]:
    k = job.spec.kubernetes
    meta_labels = labels(job)
    if queue:
        meta_labels[QUEUE_LABEL] = queue
    spec: dict[str, Any] = {
        "entrypoint": job.entrypoint(f"{SPEC_DIR}/{SPEC_FILE}"),
        "jobId": job.job_id,
        "submissionMode": "K8sJobMode",
        "submitterPodTemplate": submitter_pod(k, labels(job)),
    }
    if cluster:
        spec["clusterSelector"] = {CLUSTER_KEY: cluster}
        spec["backoffLimit"] = 0
    else:
        spec.update(
            backoffLimit=k.backoffLimit,
            shutdownAfterJobFinishes=True,
            ttlSecondsAfterFinished=k.ttlSecondsAfterFinished,
            rayClusterSpec=_cluster_spec(job),
        )
    if queue:
        spec["suspend"] = True
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "RayJob",
        "metadata": {
            "name": job.job_id,
            "namespace": namespace,
            "labels": meta_labels,
            "annotations": {JOB_NAME_ANNOTATION: job.spec.name},
        },
        "spec": spec,
    }


def _cluster_spec(job: PreparedJob) -> dict[str, Any]:
    c, k = job.spec.cluster, job.spec.kubernetes
    pods, per_pod = pod_processes(job.spec)
    gpus = math.ceil(c.gpus_per_process * per_pod)
    worker_cpu = k.worker.cpu or f"{c.cpus_per_process * per_pod:g}"
    head = resources(k.head.cpu or "1", k.head.memory, 0)
    return {
        "rayVersion": RAY_VERSION,
        "headGroupSpec": {
            "rayStartParams": {"num-cpus": "0"},  # the head schedules no meta-workers
            "template": ray_pod(job, labels(job), "ray-head", head),
        },
        "workerGroupSpecs": [
            {
                "groupName": "gpu-workers" if gpus else "cpu-workers",
                "replicas": pods,
                "minReplicas": pods,
                "maxReplicas": pods,
                # Ray counts the pod's CPU limit; the processes need only cpus_per_process each.
                "rayStartParams": {"num-cpus": f"{c.cpus_per_process * per_pod:g}"} if k.worker.cpu else {},
                "template": ray_pod(
                    job, labels(job), "ray-worker", resources(worker_cpu, k.worker.memory, gpus), gpu=gpus > 0
                ),
            }
        ],
    }
