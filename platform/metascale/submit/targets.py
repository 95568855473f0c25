"""Where a job goes: `--to http://HOST:8265` (Ray Job Submission API) or `k8s://[CONTEXT/]NAMESPACE` (KubeRay).

Also the job IDs: one ID names the job on either kind of cluster, so it must be a valid Ray submission ID and a valid
RayJob name (a DNS-1035 label of at most 47 characters: KubeRay appends 6 characters for the RayCluster's name).
"""

from __future__ import annotations

import re
import secrets
import string
from dataclasses import dataclass
from urllib.parse import urlsplit

from metascale.errors import MetascaleError

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_JOB_ID = re.compile(r"^[a-z]([-a-z0-9]{0,45}[a-z0-9])?$")
MAX_JOB_ID = 47


class TargetError(MetascaleError):
    """A `--to` URL or job ID that cannot be right, rejected before any request is sent."""

    exit_code = 2


@dataclass(frozen=True)
class RayTarget:
    """A Ray cluster's dashboard address (the Job Submission API), e.g. http://127.0.0.1:8265."""

    address: str

    @property
    def url(self) -> str:
        return self.address


@dataclass(frozen=True)
class K8sTarget:
    """A Kubernetes namespace with the KubeRay operator; `context` picks a kubeconfig context (default: current)."""

    namespace: str
    context: str | None = None

    @property
    def url(self) -> str:
        return f"k8s://{self.context}/{self.namespace}" if self.context else f"k8s://{self.namespace}"


Target = RayTarget | K8sTarget


def parse_target(url: str) -> Target:
    """Parses `--to`; the namespace is the last path segment, since contexts (EKS ARNs) may contain '/'."""
    if url.startswith("k8s://"):
        rest = url[len("k8s://") :]
        context, _, namespace = rest.rpartition("/")
        if not _DNS1123_LABEL.match(namespace):
            raise TargetError(
                f"--to {url!r}: expected k8s://[CONTEXT/]NAMESPACE with NAMESPACE a Kubernetes name "
                f"(lowercase letters, digits and '-'), got {namespace!r}"
            )
        return K8sTarget(namespace=namespace, context=context or None)
    parts = urlsplit(url)
    if parts.scheme in ("http", "https") and parts.hostname:
        if parts.query or parts.fragment:
            raise TargetError(f"--to {url!r}: a Ray dashboard address takes no query or fragment")
        return RayTarget(address=url.rstrip("/"))
    raise TargetError(
        f"--to {url!r}: expected http(s)://HOST:8265 (a Ray cluster's dashboard) or k8s://[CONTEXT/]NAMESPACE (KubeRay)"
    )


def new_job_id(name: str) -> str:
    """`<job name as a DNS label>-<6 random chars>`: readable in `kubectl get rayjobs` and unique per submission."""
    slug = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    if not slug or not slug[0].isalpha():
        slug = f"j-{slug}".rstrip("-")
    suffix = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(6))
    return f"{slug[: MAX_JOB_ID - 7].rstrip('-')}-{suffix}"


def check_job_id(job_id: str) -> str:
    if not _JOB_ID.match(job_id):
        raise TargetError(
            f"job ID {job_id!r}: expected a metascale job ID such as 'sinusoid-maml-x7k2qp' "
            f"(lowercase letters, digits and '-', at most {MAX_JOB_ID} characters)"
        )
    return job_id
