"""Jobs on Kubernetes as KubeRay RayJobs, through the official `kubernetes` client and the user's kubeconfig.

submit creates the RayJob, then the ConfigMap holding its spec (owned by the RayJob, so deleting the job removes it);
status reads the RayJob's status; logs read the KubeRay submitter pod (label job-name=ID), which tails the driver;
cancel deletes the RayJob (KubeRay stops the job and removes its cluster). API errors become one line each.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from metascale.submit.backend import TERMINAL, JobInfo, http_timeout
from metascale.submit.package import PreparedJob
from metascale.submit.rayjob import GROUP, MANAGED_BY, PLURAL, VERSION, ClusterShape, rayjob, spec_configmap
from metascale.errors import ClusterError
from metascale.extras import require
from metascale.submit.targets import K8sTarget, check_job_id


class KubeRayJobs:
    def __init__(self, target: K8sTarget, shape: ClusterShape = ClusterShape()):
        require("kubernetes")
        self.target = target
        self.shape = shape
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
                GROUP, VERSION, ns, PLURAL, rayjob(job, ns, self.shape),
                field_validation="Strict", _request_timeout=http_timeout(), **opts,
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
        custom, _ = self._client()
        with self._errors(job_id):
            obj = custom.get_namespaced_custom_object(
                GROUP, VERSION, self.target.namespace, PLURAL, job_id, _request_timeout=http_timeout()
            )
        return _info(obj)

    def logs(self, job_id: str, follow: bool, emit: Callable[[str], None]) -> None:
        """The submitter pod's log: `ray job submit` tails the driver there, as KubeRay's docs suggest."""
        check_job_id(job_id)
        _, core = self._client()
        pod = self._submitter_pod(job_id, wait=follow)
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
                    pod, self.target.namespace, follow=True, _preload_content=False,
                    _request_timeout=http_timeout(), **({} if since is None else {"since_seconds": since}),
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

    def cancel(self, job_id: str) -> None:
        check_job_id(job_id)
        self._delete(job_id)

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
                    GROUP, VERSION, self.target.namespace, PLURAL, job_id,
                    propagation_policy="Background", _request_timeout=http_timeout(),
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
                raise ClusterError(f"the Kubernetes API server for {url} did not answer within "
                                   f"{http_timeout()[1]:g} s") from None
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
    status = obj.get("status") or {}
    deployment = status.get("jobDeploymentStatus") or "Initializing"
    detail = " ".join(x for x in (deployment, status.get("reason") or "", status.get("message") or "") if x)
    return JobInfo(
        job_id=obj["metadata"]["name"],
        name=(obj["metadata"].get("annotations") or {}).get("metascale.io/job-name", ""),
        status=status.get("jobStatus") or "PENDING",
        message=_first_line(detail),
    )
