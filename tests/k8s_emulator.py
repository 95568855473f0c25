"""A small Kubernetes API-server emulator on 127.0.0.1, plus the schema checks it (and the chart tests) apply.

No kube-apiserver, kind, k3s or minikube can run on these machines, and no maintained Python emulator serves custom
resources, so this is a FAKE of the API server (not of the client: the tests drive the official `kubernetes` client
against it over HTTP). It serves only what metascale uses: RayJobs/RayClusters (ray.io/v1), ConfigMaps, Pods and pod
logs, with the API server's behaviours the submitter must handle: Status objects for 401/403/404/409/400/422,
`dryRun=All`, `fieldValidation=Strict` (unknown fields -> 400), JSON merge patches (RFC 7386) of RayJobs, validated
like a create, schema validation (-> 422: KubeRay's CRD schema for
ray.io kinds, Kubernetes' own schemas via `kubernetes-validate` for built-in kinds), complete objects in responses
(uid, resourceVersion, creationTimestamp), label selectors, and garbage collection of ConfigMaps owned by a deleted
RayJob. `operator_step` stands in for the KubeRay operator (no operator runs here): it sets a RayJob's status and
creates its submitter pod with a log; `operator_suspend` does what KubeRay does to a RayJob whose spec.suspend was set.
The `restricted` Pod Security Standard's checks are in pod_security.py.
"""

from __future__ import annotations

import copy
import datetime
import functools
import json
import os
import re
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jsonschema
import kubernetes_validate
import yaml

REPO = Path(__file__).resolve().parent.parent
CRD_FILES = {"RayJob": "ray.io_rayjobs.yaml", "RayCluster": "ray.io_rayclusters.yaml"}
CRD_ENV = "METASCALE_KUBERAY_CRDS"
CRD_PLACES = (REPO / ".cache" / "kuberay-crds", REPO.parent / "shared" / "kuberay-crds")  # set-up's cache, CI's copy
K8S_VERSION = "1.33"
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


# ------------------------------------------------------------------------------------------------ schemas
def crd_dir() -> Path | None:
    """The folder holding KubeRay's CRD files: $METASCALE_KUBERAY_CRDS alone when it is set (so a run can stand for a
    checkout without the others), else the cache scripts/fetch-kuberay-crds.sh fills, else the copy CI keeps beside
    the checkout; None when none holds both files (the `kuberay_crds` fixture then skips)."""
    env = os.environ.get(CRD_ENV)
    places = (Path(env),) if env else CRD_PLACES
    return next((d for d in places if all((d / f).is_file() for f in CRD_FILES.values())), None)


@functools.lru_cache(maxsize=None)
def crd_schema(kind: str, strict: bool = True) -> dict[str, Any]:
    """KubeRay's v1 openAPIV3Schema; strict adds additionalProperties: false wherever unknown fields are not kept."""
    folder = crd_dir()
    if folder is None:  # a test that validates ray.io objects without taking the kuberay_crds fixture
        raise RuntimeError(
            f"KubeRay's CRDs were not found (${CRD_ENV}, {', '.join(map(str, CRD_PLACES))}); "
            f"tests that validate {kind} objects must take the kuberay_crds fixture"
        )
    path = folder / CRD_FILES[kind]
    with path.open() as f:
        crd = yaml.load(f, Loader=yaml.CSafeLoader)  # the pure-Python loader takes seconds on 1.4 MB
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    return _strict(copy.deepcopy(schema)) if strict else schema


def _strict(node: Any) -> Any:
    if isinstance(node, dict):
        if (
            node.get("type") == "object"
            and "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        for v in node.values():
            _strict(v)
    elif isinstance(node, list):
        for v in node:
            _strict(v)
    return node


def schema_errors(obj: dict[str, Any], unknown_fields: bool = True) -> list[str]:
    """Problems with one object, as `path: message` lines; [] when valid. unknown_fields=False leaves out unknown
    fields (an API server without fieldValidation=Strict drops them)."""
    return [msg for msg, unknown in _problems(obj) if unknown_fields or not unknown]


def unknown_field_errors(obj: dict[str, Any]) -> list[str]:
    return [msg for msg, unknown in _problems(obj) if unknown]


def _problems(obj: dict[str, Any]) -> list[tuple[str, bool]]:
    kind = obj.get("kind")
    if kind not in CRD_FILES:
        return [(e, "Additional properties" in e) for e in _builtin_errors(obj)]
    if obj.get("apiVersion") != "ray.io/v1":
        return [(f"apiVersion: expected ray.io/v1 for {kind}, got {obj.get('apiVersion')!r}", False)]
    validator = jsonschema.Draft7Validator(crd_schema(kind, strict=True))
    problems = [
        (f"{'.'.join(str(p) for p in e.absolute_path) or '(root)'}: {e.message}", e.validator == "additionalProperties")
        for e in validator.iter_errors(obj)
    ]
    problems += [(e, False) for e in _meta_errors(obj)]
    for where, template in _pod_templates(obj):  # embedded pods, against Kubernetes' own Pod schema
        problems += [(f"{where}: {e}", "Additional properties" in e) for e in _builtin_errors(_as_pod(template))]
    return problems


def _builtin_errors(obj: dict[str, Any]) -> list[str]:
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = ".".join(str(p) for p in e.path) or "(root)"
        return [f"{path}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError:
        return [f"kind {obj.get('kind')!r} ({obj.get('apiVersion')}) has no Kubernetes {K8S_VERSION} schema"]
    return []


def _meta_errors(obj: dict[str, Any]) -> list[str]:
    meta = obj.get("metadata") or {}
    name = meta.get("name", "")
    if not isinstance(name, str) or not _NAME.match(name) or len(name) > 253:
        return [f"metadata.name: {name!r} is not a valid Kubernetes name"]
    return []


def _pod_templates(obj: dict[str, Any]):
    spec = obj.get("spec") or {}
    if obj["kind"] == "RayJob" and "submitterPodTemplate" in spec:
        yield "submitterPodTemplate", spec["submitterPodTemplate"]
    cluster = (spec.get("rayClusterSpec") or {}) if obj["kind"] == "RayJob" else spec
    if "headGroupSpec" in cluster:
        yield "headGroupSpec.template", cluster["headGroupSpec"].get("template", {})
    for i, group in enumerate(cluster.get("workerGroupSpecs") or []):
        yield f"workerGroupSpecs[{i}].template", group.get("template", {})


def _as_pod(template: dict[str, Any]) -> dict[str, Any]:
    meta = {k: v for k, v in (template.get("metadata") or {}).items() if k in ("labels", "annotations")}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "template", **meta}, "spec": template.get("spec")}


# ----------------------------------------------------------------------------------------------- emulator
ROUTES = re.compile(
    r"^/(?:apis/(?P<group>ray\.io)/v1|api/v1)/namespaces/(?P<ns>[^/]+)/(?P<plural>[a-z]+)(?:/(?P<name>[^/]+))?"
    r"(?:/(?P<sub>log))?$"
)
KINDS = {"rayjobs": "RayJob", "rayclusters": "RayCluster", "configmaps": "ConfigMap", "pods": "Pod"}


class ApiServerEmulator:
    """Start with `with ApiServerEmulator(token) as emu:`; `emu.server` is the URL for a kubeconfig."""

    def __init__(self, token: str, forbidden_namespaces: frozenset[str] = frozenset()):
        self.token = token
        self.forbidden = forbidden_namespaces
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}  # (plural, namespace, name)
        self.logs: dict[tuple[str, str], str] = {}
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._rv = 0
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def server(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def __enter__(self) -> "ApiServerEmulator":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)

    def kubeconfig(self, path: Path, namespace: str = "default") -> Path:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "emulator", "cluster": {"server": self.server}}],
            "users": [{"name": "tester", "user": {"token": self.token}}],
            "contexts": [{"name": "emu", "context": {"cluster": "emulator", "user": "tester", "namespace": namespace}}],
            "current-context": "emu",
        }
        path.write_text(yaml.safe_dump(config))
        return path

    def operator_suspend(self, ns: str, name: str) -> None:
        """KubeRay on spec.suspend (rayjob_controller.go, JobDeploymentStatusSuspending): it deletes the RayCluster and
        the submitter Job (with its pod and log), resets jobStatus and the job ID, and reports Suspended."""
        with self._lock:
            job = self.objects[("rayjobs", ns, name)]
            assert job["spec"].get("suspend") is True, "KubeRay suspends only a RayJob whose spec.suspend is true"
            job["status"] = {"jobStatus": "", "jobDeploymentStatus": "Suspended"}
            for key, obj in list(self.objects.items()):
                if key[0] == "pods" and key[1] == ns and obj["metadata"].get("labels", {}).get("job-name") == name:
                    del self.objects[key]
                    self.logs.pop((ns, key[2]), None)

    def operator_step(self, ns: str, name: str, job_status: str, deployment: str, log: str = "") -> None:
        """Stands in for the KubeRay operator: sets the RayJob's status and gives it a submitter pod with a log."""
        with self._lock:
            job = self.objects[("rayjobs", ns, name)]
            job["status"] = {"jobStatus": job_status, "jobDeploymentStatus": deployment, "jobId": name}
            pod_name = f"{name}-submitter"
            self.objects[("pods", ns, pod_name)] = self._stamp(
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {"name": pod_name, "namespace": ns, "labels": {"job-name": name}},
                    "spec": {"containers": [{"name": "ray-job-submitter", "image": "rayproject/ray:2.60.0"}]},
                    "status": {"phase": "Running"},
                }
            )
            self.logs[(ns, pod_name)] = log

    # ---- request handling (called from the server threads)
    def handle(self, method: str, url: str, headers: dict[str, str], body: bytes) -> tuple[int, Any]:
        parts = urlsplit(url)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        self.requests.append((method, url))
        if headers.get("authorization") != f"Bearer {self.token}":
            return _status(401, "Unauthorized", "Unauthorized")
        m = ROUTES.match(parts.path)
        if not m or m["plural"] not in KINDS or (m["group"] is not None) != (m["plural"] in ("rayjobs", "rayclusters")):
            return _status(404, "NotFound", f"the server could not find the requested resource ({parts.path})")
        ns, plural, name, kind = m["ns"], m["plural"], m["name"], KINDS[m["plural"]]
        resource = f"{plural}.ray.io" if m["group"] else plural
        if ns in self.forbidden:
            verb = {"POST": "create", "DELETE": "delete"}.get(method, "get" if name else "list")
            return _status(
                403,
                "Forbidden",
                f'{resource} is forbidden: User "tester" cannot {verb} resource "{plural}" in the namespace "{ns}"',
            )
        with self._lock:
            if method == "POST" and not name:
                return self._create(ns, plural, kind, resource, json.loads(body or b"{}"), query)
            if method == "GET" and name and m["sub"] == "log":
                if ("pods", ns, name) not in self.objects:
                    return _status(404, "NotFound", f'pods "{name}" not found')
                return 200, self.logs.get((ns, name), "")
            if method == "GET" and name:
                obj = self.objects.get((plural, ns, name))
                return (200, obj) if obj else _status(404, "NotFound", f'{resource} "{name}" not found')
            if method == "GET":
                return 200, self._list(ns, plural, kind, query.get("labelSelector", ""))
            if method == "DELETE" and name:
                return self._delete(ns, plural, resource, name, query)
            if method == "PATCH" and name and plural == "rayjobs":
                return self._patch(ns, plural, kind, resource, name, headers.get("content-type", ""), body, query)
        return _status(405, "MethodNotAllowed", f"{method} is not supported on {parts.path}")

    def _create(self, ns: str, plural: str, kind: str, resource: str, obj: dict, query: dict) -> tuple[int, Any]:
        name = (obj.get("metadata") or {}).get("name", "")
        if obj.get("kind") != kind:
            return _status(400, "BadRequest", f"the body's kind {obj.get('kind')!r} does not match {kind}")
        if query.get("fieldValidation") == "Strict":
            unknown = unknown_field_errors(obj)
            if unknown:
                return _status(400, "BadRequest", f"strict decoding error: unknown field(s): {'; '.join(unknown)}")
        problems = schema_errors(obj, unknown_fields=False)
        if problems:
            return _status(
                422, "Invalid", f'{kind}.{resource.partition(".")[2] or ""} "{name}" is invalid: ' + "; ".join(problems)
            )
        if (plural, ns, name) in self.objects:
            return _status(409, "AlreadyExists", f'{resource} "{name}" already exists')
        obj = self._stamp(copy.deepcopy(obj), ns)
        if query.get("dryRun") != "All":
            self.objects[(plural, ns, name)] = obj
        return 201, obj

    def _patch(
        self, ns: str, plural: str, kind: str, resource: str, name: str, content_type: str, body: bytes, query: dict
    ) -> tuple[int, Any]:
        """A JSON merge patch (custom resources take no strategic merge patch), validated like a create."""
        obj = self.objects.get((plural, ns, name))
        if obj is None:
            return _status(404, "NotFound", f'{resource} "{name}" not found')
        if content_type.split(";")[0].strip() != "application/merge-patch+json":
            return _status(
                415,
                "UnsupportedMediaType",
                f"the body of the request was in an unknown format "
                f"- accepted media types include: application/merge-patch+json (got {content_type!r})",
            )
        patched = _merge_patch(copy.deepcopy(obj), json.loads(body or b"{}"))
        problems = schema_errors(patched, unknown_fields=query.get("fieldValidation") == "Strict")
        if problems:
            return _status(
                422, "Invalid", f'{kind}.{resource.partition(".")[2]} "{name}" is invalid: ' + "; ".join(problems)
            )
        if query.get("dryRun") != "All":
            self._rv += 1
            patched["metadata"]["resourceVersion"] = str(self._rv)
            self.objects[(plural, ns, name)] = patched
        return 200, patched

    def _delete(self, ns: str, plural: str, resource: str, name: str, query: dict) -> tuple[int, Any]:
        obj = self.objects.get((plural, ns, name))
        if obj is None:
            return _status(404, "NotFound", f'{resource} "{name}" not found')
        if query.get("dryRun") == "All":
            return 200, obj
        del self.objects[(plural, ns, name)]
        uid = obj["metadata"]["uid"]
        for key, other in list(self.objects.items()):  # the garbage collector, for owned objects
            if any(ref.get("uid") == uid for ref in other["metadata"].get("ownerReferences", [])):
                del self.objects[key]
        return 200, {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Success",
            "details": {"name": name, "kind": plural, "uid": uid},
        }

    def _list(self, ns: str, plural: str, kind: str, selector: str) -> dict[str, Any]:
        want = dict(p.split("=", 1) for p in selector.split(",") if "=" in p)
        items = [
            o
            for (p, n, _), o in sorted(self.objects.items())
            if p == plural and n == ns and all(o["metadata"].get("labels", {}).get(k) == v for k, v in want.items())
        ]
        api_version = "ray.io/v1" if plural.startswith("ray") else "v1"
        return {
            "apiVersion": api_version,
            "kind": f"{kind}List",
            "metadata": {"resourceVersion": str(self._rv)},
            "items": items,
        }

    def _stamp(self, obj: dict[str, Any], ns: str | None = None) -> dict[str, Any]:
        self._rv += 1
        meta = obj.setdefault("metadata", {})
        meta.update(
            namespace=ns or meta.get("namespace"),
            uid=str(uuid.uuid4()),
            resourceVersion=str(self._rv),
            generation=1,
            creationTimestamp=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        )
        return obj


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge key by key, null deletes a key, anything else replaces."""
    if not isinstance(patch, dict):
        return patch
    if not isinstance(target, dict):
        target = {}
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        else:
            target[key] = _merge_patch(target.get(key), value)
    return target


def _status(code: int, reason: str, message: str) -> tuple[int, dict[str, Any]]:
    return code, {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def _handler(emu: ApiServerEmulator):
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length) if length else b""
            headers = {k.lower(): v for k, v in self.headers.items()}
            code, payload = emu.handle(self.command, self.path, headers, body)
            text = payload if isinstance(payload, str) else json.dumps(payload)
            data = text.encode()
            self.send_response(code)
            self.send_header("content-type", "text/plain" if isinstance(payload, str) else "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = _serve

        def log_message(self, *args) -> None:  # quiet
            pass

    return Handler


# ------------------------------------------------------------------------------------ rules beyond the schema
def rule_violations(obj: dict[str, Any]) -> list[str]:
    """What KubeRay's operator or the kubelet would refuse later, which no schema can express."""
    problems: list[str] = []
    spec = obj.get("spec") or {}
    if obj.get("kind") == "RayJob":
        if spec.get("ttlSecondsAfterFinished", 0) > 0 and not spec.get("shutdownAfterJobFinishes"):
            problems.append("RayJob: ttlSecondsAfterFinished needs shutdownAfterJobFinishes: true")
        # KubeRay's ValidateRayJobSpec (ray-operator/controllers/ray/utils/validation.go, v1.7.0)
        if spec.get("suspend") and not spec.get("shutdownAfterJobFinishes"):
            problems.append("RayJob: suspend needs shutdownAfterJobFinishes: true")
        if spec.get("clusterSelector"):
            if spec.get("suspend"):
                problems.append("RayJob: the clusterSelector mode doesn't support suspend")
            if spec.get("backoffLimit", 0) > 0:
                problems.append("RayJob: backoffLimit is incompatible with clusterSelector")
            if not spec["clusterSelector"].get("ray.io/cluster"):
                problems.append("RayJob: clusterSelector needs ray.io/cluster")
        elif not spec.get("rayClusterSpec"):
            problems.append("RayJob: one of rayClusterSpec or clusterSelector must be set")
        spec = spec.get("rayClusterSpec") or {}
    if obj.get("kind") not in CRD_FILES:
        return problems
    for g in spec.get("workerGroupSpecs") or []:
        lo, n, hi = g.get("minReplicas", 0), g.get("replicas", g.get("minReplicas", 0)), g.get("maxReplicas", 0)
        if not lo <= n <= hi:
            problems.append(
                f"group {g.get('groupName')}: need minReplicas ({lo}) <= replicas ({n}) <= maxReplicas ({hi})"
            )
    for where, template in _pod_templates(obj):
        pod = template.get("spec") or {}
        if not (pod.get("securityContext") or {}).get("runAsNonRoot"):
            problems.append(f"{where}: pods must set securityContext.runAsNonRoot: true")
        for c in pod.get("containers") or []:
            res = c.get("resources") or {}
            for key in {k for part in res.values() for k in part if k.endswith("/gpu")}:
                if str(res.get("requests", {}).get(key)) != str(res.get("limits", {}).get(key)):
                    problems.append(f"{where} {c['name']}: {key} requests must equal limits")
            for e in c.get("env") or []:
                if e["name"] == "WANDB_API_KEY" and "secretKeyRef" not in (e.get("valueFrom") or {}):
                    problems.append(f"{where} {c['name']}: WANDB_API_KEY must come from a secretKeyRef")
    return problems


def pod_templates(obj: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(where, pod spec) of every pod template in a RayJob or RayCluster: submitter, head, worker groups."""
    return [(where, template.get("spec") or {}) for where, template in _pod_templates(obj)]
