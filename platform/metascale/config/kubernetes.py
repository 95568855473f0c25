"""The `kubernetes:` section: how the pods of a job submitted with `--to k8s://` look (ignored by every other target).

Fields that are Kubernetes' own keep Kubernetes' names and shapes (nodeSelector, tolerations, volumes, ...), so they
can be pasted from a manifest. What can be checked here is (names, label syntax, the volume types the `restricted`
Pod Security Standard allows, mounts naming a volume); the API server checks the rest of each object's schema. The
defaults give the RayJob metascale always made: the image from deploy/Dockerfile, a 1-CPU/4Gi head, 8Gi workers.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from metascale.config.sections import Spec

# Kubernetes' names (apimachinery validation): DNS-1123 labels and subdomains, label keys and values.
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$")
DNSLabel = Annotated[str, Field(pattern=DNS_LABEL)]
DNSSubdomain = Annotated[str, Field(pattern=DNS_SUBDOMAIN, max_length=253)]
# A resource quantity: "500m", "2", "1.5", "4Gi", "8G", "1e3".
Quantity = Annotated[str, Field(pattern=r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei|[eE][0-9]+)?$")]
CpuQuantity = Annotated[str, Field(pattern=r"^[0-9]+(\.[0-9]+)?m?$")]

# The volume types the `restricted` Pod Security Standard allows (no hostPath, nfs, ...), and those whose data
# outlives the pod (checkpoints may live there; submit/ephemeral.py).
RESTRICTED_VOLUME_TYPES = (
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
)
PERSISTENT_VOLUME_TYPES = ("persistentVolumeClaim", "csi")
# Paths metascale mounts itself in every Ray container.
RESERVED_MOUNTS = ("/etc/metascale", "/tmp/ray")


def cpu_millis(quantity: str) -> int:
    return round(float(quantity[:-1])) if quantity.endswith("m") else round(float(quantity) * 1000)


class PodResources(Spec):
    """A Ray container's CPU and memory (requests = limits). GPUs always come from cluster.gpus_per_process."""

    cpu: CpuQuantity | None = None  # None: the head 1, a worker cluster.cpus_per_process x the processes it hosts
    memory: Quantity


class Toleration(Spec):
    key: str | None = None
    operator: Literal["Exists", "Equal"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    tolerationSeconds: int | None = None


class LocalObjectReference(Spec):
    name: DNSSubdomain


class PersistentVolumeClaimSource(Spec):
    claimName: DNSSubdomain
    readOnly: bool = False


class Volume(Spec):
    """A pod volume of one of the types the restricted profile allows; besides persistentVolumeClaim, the source is
    Kubernetes' own object, passed on as written (the API server validates it)."""

    name: DNSLabel
    persistentVolumeClaim: PersistentVolumeClaimSource | None = None
    csi: dict[str, Any] | None = None
    configMap: dict[str, Any] | None = None
    secret: dict[str, Any] | None = None
    emptyDir: dict[str, Any] | None = None
    ephemeral: dict[str, Any] | None = None
    projected: dict[str, Any] | None = None
    downwardAPI: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _allowed_type(cls, raw: Any) -> Any:
        if isinstance(raw, dict):
            for key in raw:
                if key != "name" and key not in RESTRICTED_VOLUME_TYPES:
                    raise ValueError(
                        f"volume type {key!r} is not allowed by the restricted Pod Security Standard "
                        f"(allowed: {', '.join(RESTRICTED_VOLUME_TYPES)})"
                    )
        return raw

    @model_validator(mode="after")
    def _one_source(self) -> "Volume":
        if len(self.sources()) != 1:
            raise ValueError(f"volume {self.name!r} needs exactly one of {', '.join(RESTRICTED_VOLUME_TYPES)}")
        return self

    def sources(self) -> list[str]:
        return [t for t in RESTRICTED_VOLUME_TYPES if getattr(self, t) is not None]

    @property
    def persistent(self) -> bool:
        return self.sources()[0] in PERSISTENT_VOLUME_TYPES


class VolumeMount(Spec):
    name: DNSLabel
    mountPath: Annotated[str, Field(pattern=r"^/")]
    readOnly: bool = False
    subPath: str | None = None


class KubernetesSpec(Spec):
    image: Annotated[str, Field(pattern=r"^[^\s]+$")] = "metascale:0.1.0"
    head: PodResources = PodResources(cpu="1", memory="4Gi")
    worker: PodResources = PodResources(memory="8Gi")
    nodeSelector: dict[str, str] = {}
    tolerations: list[Toleration] = []
    serviceAccountName: DNSSubdomain | None = None  # the Ray pods' (e.g. a cloud identity for s3:// checkpoints)
    imagePullSecrets: list[LocalObjectReference] = []
    volumes: list[Volume] = []
    volumeMounts: list[VolumeMount] = []  # in every Ray container (head and workers)
    priorityClassName: DNSSubdomain | None = None
    # How long a finished RayJob stays for `status`/`logs` (its cluster is shut down when the job ends).
    ttlSecondsAfterFinished: Annotated[int, Field(ge=0)] = 3600
    wandb_secret: DNSSubdomain = "metascale-wandb"  # a Secret with key `api-key`; referenced, never read
    # Retries of a failed job, each on a new RayCluster; the entrypoint runs with --auto-resume, so a retry continues
    # from the newest checkpoint where checkpoint.dir outlives the pods. 0 with `submit --cluster` (KubeRay's rule).
    backoffLimit: Annotated[int, Field(ge=0)] = 2

    @field_validator("nodeSelector")
    @classmethod
    def _labels(cls, selector: dict[str, str]) -> dict[str, str]:
        for key, value in selector.items():
            prefix, _, name = key.rpartition("/")
            if (prefix and not re.match(DNS_SUBDOMAIN, prefix)) or not _LABEL_NAME.match(name):
                raise ValueError(f"{key!r} is not a Kubernetes label key")
            if not _LABEL_VALUE.match(value):
                raise ValueError(f"{key}: {value!r} is not a Kubernetes label value (63 characters of [A-Za-z0-9-_.])")
        return selector

    @model_validator(mode="after")
    def _mounts(self) -> "KubernetesSpec":
        names = [v.name for v in self.volumes]
        if len(set(names)) != len(names) or {"metascale-spec", "ray-tmp"} & set(names):
            raise ValueError("volumes: names must be unique and not metascale-spec or ray-tmp (metascale's own)")
        paths = [m.mountPath.rstrip("/") or "/" for m in self.volumeMounts]
        if len(set(paths)) != len(paths):
            raise ValueError("volumeMounts: two mounts at one mountPath")
        for m, path in zip(self.volumeMounts, paths):
            if m.name not in names:
                raise ValueError(f"volumeMounts: {m.name!r} names no volume in kubernetes.volumes")
            if any(path == r or path.startswith(r + "/") or r.startswith(path + "/") for r in RESERVED_MOUNTS):
                raise ValueError(
                    f"volumeMounts: {m.mountPath} overlaps metascale's own mounts ({', '.join(RESERVED_MOUNTS)})"
                )
        return self

    def volume(self, name: str) -> Volume:
        return next(v for v in self.volumes if v.name == name)
