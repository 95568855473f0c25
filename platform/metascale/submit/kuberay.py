"""Jobs on Kubernetes as KubeRay RayJobs, through the official `kubernetes` client and the user's kubeconfig.

submit creates the RayJob, then the ConfigMap holding its spec (owned by the RayJob, so deleting the job removes it);
status reads the RayJob's status; logs read the KubeRay submitter pod (label job-name=ID), which tails the driver.
cancel keeps the job's record: it first saves the submitter's log and the job's state locally (state.py), since
KubeRay deletes that pod, then suspends the RayJob (spec.suspend: KubeRay deletes its RayCluster and submitter, and the
RayJob stays, Suspended). Where KubeRay or Kueue does not allow that (a job on an existing RayCluster: KubeRay refuses
suspend there; a Kueue job: Kueue owns spec.suspend and would resume it) the RayJob is deleted, and KubeRay's
finalizer stops the Ray job; status and logs then answer from the local record. API errors become one line each.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from metascale.errors import ClusterError
from metascale.extras import require
from metascale.submit import state
from metascale.submit.backend import TERMINAL, JobInfo, http_timeout
from metascale.submit.package import PreparedJob
from metascale.submit.rayjob import (
    CLUSTER_KEY,
    GROUP,
    JOB_NAME_ANNOTATION,
    MANAGED_BY,
    PLURAL,
    QUEUE_LABEL,
    VERSION,
    rayjob,
    spec_configmap,
)
from metascale.submit.targets import K8sTarget, check_job_id

CANCELLED = "metascale.io/cancelled"  # annotation: set with spec.suspend by `cancel`, so status can say STOPPED


class KubeRayJobs:
    """queue: a Kueue LocalQueue; cluster: an existing RayCluster to run on (see rayjob.py)."""

    def __init__(self, target: K8sTarget, queue: str | None = None, cluster: str | None = None):
        require("kubernetes")
        self.target = target
        self.queue, self.cluster = queue, cluster
        self._api = None

    def _client(self):
        if self._api is None:
            from kubernetes import client, config

            try:
                # The client reads $KUBECONFIG once at import; read it now (it may list several files).
                path = os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
                api_client = config.new_client_from_config(config_file=path, context=self.target.context)
            except (config.ConfigException, FileNotFoundError, OSError) as e:
                raise ClusterError(f"cannot load the kubeconfig for {self.target.url}: {_first_line(str(e))}") from None
            api_client.configuration.retries = 1
            self._api = (client.CustomObjectsApi(api_client), client.CoreV1Api(api_client))
        return self._api

    def submit(self, job: PreparedJob, dry_run: bool = False) -> str:
        custom, core = self._client()
        ns = self.target.namespace
        opts: dict[str, Any] = {"dry_run": "All"} if dry_run else {}
        from kubernetes import client

        with self._errors(job.job_id, creating=True):
            created = custom.create_namespaced_custom_object(
                GROUP,
                VERSION,
                ns,
                PLURAL,
                rayjob(job, ns, self.queue, self.cluster),
                field_validation="Strict",
                _request_timeout=http_timeout(),
                **opts,
            )
        owner = None if dry_run else created["metadata"]["uid"]
        try:
            with self._errors(f"{job.job_id}-spec", creating=True, kind="ConfigMap"):
                body = client.V1ConfigMap.from_dict(spec_configmap(job, ns, owner))
                core.create_namespaced_config_map(
                    ns, body, field_validation="Strict", _request_timeout=http_timeout(), **opts
                )
        except ClusterError:
            if not dry_run:  # no half-made job: the RayJob would wait forever for its spec
                self._delete(job.job_id, missing_ok=True)
            raise
        return job.job_id

    def status(self, job_id: str) -> JobInfo:
        check_job_id(job_id)
        try:
            return _info(self._get(job_id))
        except ClusterError as e:
            record = state.cancelled(job_id)
            if record is None or not str(e).startswith("no RayJob"):
                raise
            return JobInfo(
                job_id,
                record["name"],
                "STOPPED",
                f"cancelled; the RayJob is gone, this is the local record: {record['message']}",
            )

    def _get(self, job_id: str) -> dict[str, Any]:
        custom, _ = self._client()
        with self._errors(job_id):
            return custom.get_namespaced_custom_object(
                GROUP, VERSION, self.target.namespace, PLURAL, job_id, _request_timeout=http_timeout()
            )

    def logs(self, job_id: str, follow: bool, emit: Callable[[str], None]) -> None:
        """The submitter pod's log: `ray job submit` tails the driver there, as KubeRay's docs suggest. After
        `cancel` removed that pod, the log saved by cancel."""
        check_job_id(job_id)
        _, core = self._client()
        saved = state.saved_log(job_id)
        try:
            pod = self._submitter_pod(job_id, wait=follow and saved is None)
        except ClusterError:
            if saved is None:
                raise
            emit(saved)
            return
        if follow:
            self._follow(core, pod, job_id, emit)
            return
        with self._errors(job_id):
            emit(core.read_namespaced_pod_log(pod, self.target.namespace, _request_timeout=http_timeout()))

    def _follow(self, core, pod: str, job_id: str, emit: Callable[[str], None]) -> None:
        """The pod's log stream, under the same (connect, read) timeouts as every call. A running job may rightly
        print nothing for longer than the read timeout; then the job's status is asked (a timed request) and, while
        it runs, the stream is opened again from the middle of that silence (since_seconds): after the last line
        received and before any new one, so nothing is shown twice."""
        from urllib3.exceptions import ReadTimeoutError

        since: int | None = None
        while True:
            with self._errors(job_id):
                resp = core.read_namespaced_pod_log(
                    pod,
                    self.target.namespace,
                    follow=True,
                    _preload_content=False,
                    _request_timeout=http_timeout(),
                    **({} if since is None else {"since_seconds": since}),
                )
                try:
                    for chunk in resp.stream(4096):
                        emit(chunk.decode("utf-8", errors="replace"))
                    return  # the container exited: the stream ended
                except ReadTimeoutError:
                    quiet_until = time.monotonic()
                finally:
                    resp.release_conn()
            if self.status(job_id).status in TERMINAL:
                return
            since = max(1, math.ceil(time.monotonic() - quiet_until + http_timeout()[1] / 2))

    def cancel(self, job_id: str) -> str:
        """Stops the job, keeping its record (module docstring); returns what was done, in words."""
        check_job_id(job_id)
        obj = self._get(job_id)
        info = _info(obj)
        if info.status in TERMINAL:
            return f"{job_id} had already ended ({info.status}); nothing to stop"
        _, core = self._client()
        try:
            pod = self._submitter_pod(job_id, wait=False)
            with self._errors(job_id, kind="Pod"):
                state.save_log(
                    job_id, core.read_namespaced_pod_log(pod, self.target.namespace, _request_timeout=http_timeout())
                )
        except ClusterError:
            pass  # no submitter yet (queued, starting): no log to keep
        spec, labels = obj.get("spec") or {}, obj["metadata"].get("labels") or {}
        if spec.get("clusterSelector") or QUEUE_LABEL in labels:
            why = (
                f"on RayCluster {spec['clusterSelector'].get(CLUSTER_KEY)}"
                if spec.get("clusterSelector")
                else f"queued in Kueue LocalQueue {labels[QUEUE_LABEL]}"
            )
            state.mark_cancelled(job_id, self.target.url, info.name, f"was {info.status} ({info.message}); {why}")
            self._delete(job_id)
            return (
                f"stopped {job_id}: deleted its RayJob ({why}: it cannot be suspended); status and logs keep "
                f"a local record"
            )
        custom, _ = self._client()
        patch = {"metadata": {"annotations": {CANCELLED: "true"}}, "spec": {"suspend": True}}
        with self._errors(job_id):
            custom.patch_namespaced_custom_object(
                GROUP, VERSION, self.target.namespace, PLURAL, job_id, patch, _request_timeout=http_timeout()
            )
        state.mark_cancelled(job_id, self.target.url, info.name, f"was {info.status} ({info.message}); suspended")
        return f"stopped {job_id}: its RayJob is suspended (KubeRay removes its pods) and stays for status and logs"

    def list(self) -> list[JobInfo]:
        custom, _ = self._client()
        selector = ",".join(f"{k}={v}" for k, v in MANAGED_BY.items())
        with self._errors(None):
            objs = custom.list_namespaced_custom_object(
                GROUP, VERSION, self.target.namespace, PLURAL, label_selector=selector, _request_timeout=http_timeout()
            )
        items = sorted(objs.get("items", []), key=lambda o: o["metadata"].get("creationTimestamp") or "")
        return [_info(o) for o in items]

    def _delete(self, job_id: str, missing_ok: bool = False) -> None:
        custom, _ = self._client()
        try:
            with self._errors(job_id):
                custom.delete_namespaced_custom_object(
                    GROUP,
                    VERSION,
                    self.target.namespace,
                    PLURAL,
                    job_id,
                    propagation_policy="Background",
                    _request_timeout=http_timeout(),
                )
        except ClusterError:
            if not missing_ok:
                raise

    def _submitter_pod(self, job_id: str, wait: bool) -> str:
        _, core = self._client()
        while True:
            with self._errors(job_id):
                pods = core.list_namespaced_pod(
                    self.target.namespace, label_selector=f"job-name={job_id}", _request_timeout=http_timeout()
                ).items
            if pods:
                newest = max(pods, key=lambda p: p.metadata.creation_timestamp.timestamp())
                return newest.metadata.name
            info = self.status(job_id)
            if not wait or info.status in TERMINAL:
                raise ClusterError(f"job {job_id} has no submitter pod yet (status {info.status}: {info.message})")
            time.sleep(2)

    @contextmanager
    def _errors(self, name: str | None, creating: bool = False, kind: str = "RayJob") -> Iterator[None]:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError as Urllib3Error
        from urllib3.exceptions import ReadTimeoutError

        ns, url = self.target.namespace, self.target.url
        try:
            yield
        except ApiException as e:
            raise ClusterError(_api_message(e.status, _status_message(e.body), kind, name, ns, creating)) from None
        except Urllib3Error as e:
            if isinstance(e, ReadTimeoutError) or isinstance(getattr(e, "reason", None), ReadTimeoutError):
                raise ClusterError(
                    f"the Kubernetes API server for {url} did not answer within {http_timeout()[1]:g} s"
                ) from None
            raise ClusterError(f"cannot reach the Kubernetes API server for {url} ({type(e).__name__})") from None


def _api_message(code: int, detail: str, kind: str, name: str | None, ns: str, creating: bool) -> str:
    what = f"{kind} {name}" if name else f"{kind}s"
    if code == 409:
        return f"{what} already exists in namespace {ns} (a job ID is used once; submit again for a new ID)"
    if code == 422 or (code == 400 and creating):
        return f"the API server rejected {what} as invalid: {detail}"
    if code == 403:
        return f"forbidden: {detail} (the submitter needs the Role in helm/templates/rbac.yaml)"
    if code == 401:
        return f"unauthorized by the API server for namespace {ns}: check the kubeconfig's credentials"
    if code == 404 and creating:
        return f"cannot create {what} in namespace {ns}: {detail} (is the KubeRay operator's CRD installed?)"
    if code == 404:
        return f"no {what} in namespace {ns}"
    return f"the API server answered {code} for {what}: {detail}"


def _status_message(body: Any) -> str:
    """A Kubernetes Status object's message (never headers, which may echo credentials)."""
    try:
        return _first_line(json.loads(body).get("message", "")) or "(no message)"
    except (TypeError, ValueError, AttributeError):
        return _first_line(str(body or "")) or "(no message)"


def _first_line(text: str) -> str:
    return (text.strip().splitlines() or [""])[0][:400]


def _info(obj: dict[str, Any]) -> JobInfo:
    """KubeRay's status in Ray's words. A suspended RayJob has no jobStatus (KubeRay resets it): STOPPED when
    `cancel` suspended it, PENDING while Kueue holds it in its queue."""
    status, spec, meta = obj.get("status") or {}, obj.get("spec") or {}, obj["metadata"]
    deployment = status.get("jobDeploymentStatus") or "Initializing"
    detail = " ".join(x for x in (deployment, status.get("reason") or "", status.get("message") or "") if x)
    job_status = status.get("jobStatus") or "PENDING"
    if spec.get("suspend") and (meta.get("annotations") or {}).get(CANCELLED) == "true":
        job_status, detail = "STOPPED", f"cancelled: {detail}"
    elif spec.get("suspend") and QUEUE_LABEL in (meta.get("labels") or {}):
        detail = f"queued in Kueue LocalQueue {meta['labels'][QUEUE_LABEL]}: {detail}"
    return JobInfo(
        job_id=meta["name"],
        name=(meta.get("annotations") or {}).get(JOB_NAME_ANNOTATION, ""),
        status=job_status,
        message=_first_line(detail),
    )
