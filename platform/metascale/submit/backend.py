"""What every cluster backend answers, so the CLI verbs read the same on Ray and on Kubernetes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from metascale.submit.package import PreparedJob
from metascale.submit.targets import K8sTarget, RayTarget, Target

# Ray's job states; a RayJob's status.jobStatus uses the same words.
TERMINAL = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})

# Every request to a cluster waits at most this long to connect and this long for each read, so a wrong address or
# a wedged server fails in seconds instead of hanging. Read at call time (http_timeout) so tests can shorten them.
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0


def http_timeout() -> tuple[float, float]:
    """(connect, read) seconds, the form requests and the kubernetes client (_request_timeout) both take."""
    return CONNECT_TIMEOUT_S, READ_TIMEOUT_S


@dataclass(frozen=True)
class JobInfo:
    job_id: str
    name: str  # the spec's job name
    status: str  # PENDING | RUNNING | SUCCEEDED | FAILED | STOPPED
    message: str = ""  # the cluster's own words (Ray's message, KubeRay's deployment status and reason)


class Backend(Protocol):
    def submit(self, job: PreparedJob, dry_run: bool = False) -> str: ...

    def status(self, job_id: str) -> JobInfo: ...

    def logs(self, job_id: str, follow: bool, emit: Callable[[str], None]) -> None: ...

    def cancel(self, job_id: str) -> str | None: ...  # what was done, in words (None: just stopped)

    def list(self) -> list[JobInfo]: ...


def backend_for(target: Target) -> Backend:
    if isinstance(target, RayTarget):
        from metascale.submit.ray_jobs import RayJobs

        return RayJobs(target)
    if isinstance(target, K8sTarget):
        from metascale.submit.kuberay import KubeRayJobs

        return KubeRayJobs(target)
    raise TypeError(target)
