"""What a Kubernetes job would lose with its pods: checkpoints and offline W&B files on a pod's own disk.

A RayJob's pods are deleted when the job ends (and on every retry), so a checkpoint.dir or W&B dir that is a local
path outside a persistent volume (a PVC or CSI volume mounted from `kubernetes.volumeMounts`) is gone with them: the
job could never be resumed and its offline W&B run never synced. `submit` refuses such a job unless
`--allow-ephemeral`. Object-store URLs (s3://, gs://, ...) are fine. W&B files matter in modes `offline` and `auto`
(auto is offline when the W&B Secret is missing, which metascale cannot see); `online` streams everything to the
server and `disabled` writes nothing. On an existing RayCluster (`--cluster`) metascale cannot see its pods' volumes,
so only URLs count as lasting there.
"""

from __future__ import annotations

import posixpath
from urllib.parse import urlsplit

from metascale.config import JobSpec
from metascale.errors import OptInError

LOCAL_SCHEMES = ("", "file", "local", "memory")  # fsspec protocols whose files live in the process or on its disk


def ephemeral_paths(spec: JobSpec, existing_cluster: bool = False) -> list[str]:
    """`field (path)` for each place the job writes that would vanish with its pod."""
    paths = {"checkpoint.dir": spec.path(spec.checkpoint.dir)}
    if spec.logging.wandb.mode in ("offline", "auto"):
        paths["logging.wandb.dir"] = spec.path(spec.logging.wandb.dir)
    return [f"{field} ({path})" for field, path in paths.items() if not _lasts(path, spec, existing_cluster)]


def check_persistent(spec: JobSpec, existing_cluster: bool, source: str) -> None:
    lost = ephemeral_paths(spec, existing_cluster)
    if not lost:
        return
    where = (
        "an s3:// (or other object-store) URL"
        if existing_cluster
        else "an s3:// (or other object-store) URL, or an absolute path under a persistentVolumeClaim or csi volume "
        "in kubernetes.volumeMounts"
    )
    raise OptInError(
        f"{source}: {' and '.join(lost)} would live only inside the job's pods and be lost when they end; "
        f"use {where}, or pass --allow-ephemeral"
    )


def _lasts(path: str, spec: JobSpec, existing_cluster: bool) -> bool:
    scheme = urlsplit(path).scheme if "://" in path else ""
    if scheme not in LOCAL_SCHEMES:
        return True
    if existing_cluster or scheme == "memory":
        return False
    local = urlsplit(path).path if scheme else path
    if not posixpath.isabs(local):
        return False  # relative to a working directory inside the pod
    local = posixpath.normpath(local)
    k = spec.kubernetes
    for mount in k.volumeMounts:
        root = posixpath.normpath(mount.mountPath)
        under = local == root or local.startswith(root.rstrip("/") + "/")
        volume = k.volume(mount.name)
        writable = not mount.readOnly and not (volume.persistentVolumeClaim and volume.persistentVolumeClaim.readOnly)
        if under and writable and volume.persistent:
            return True
    return False
