"""Against a real Kubernetes cluster with the KubeRay operator: runs only when KUBECONFIG points at one (skipped
otherwise, as in CI). Non-destructive: a server-side dry run of a RayJob and its ConfigMap, then `list`.
Namespace: $METASCALE_K8S_NAMESPACE (default 'default'); context: the kubeconfig's current one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from metascale.submit.kuberay import KubeRayJobs
from metascale.submit.package import prepare
from metascale.submit.targets import K8sTarget

KUBECONFIG = os.environ.get("KUBECONFIG", "")  # read at import: the emulator tests set their own per test
pytestmark = pytest.mark.skipif(
    not KUBECONFIG or not all(Path(p).is_file() for p in KUBECONFIG.split(os.pathsep)),
    reason="KUBECONFIG does not point at a cluster",
)
REPO = Path(__file__).resolve().parent.parent


def test_dry_run_and_list_on_a_real_cluster(monkeypatch):
    monkeypatch.setenv("KUBECONFIG", KUBECONFIG)
    backend = KubeRayJobs(K8sTarget(os.environ.get("METASCALE_K8S_NAMESPACE", "default")))
    job = prepare(REPO / "deploy" / "job.yaml")
    assert backend.submit(job, dry_run=True) == job.job_id
    assert job.job_id not in [j.job_id for j in backend.list()]
