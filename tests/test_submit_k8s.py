"""The Kubernetes path: the real `kubernetes` client and metascale's CLI against the API-server emulator on loopback.

No kube-apiserver can run here; tests/k8s_emulator.py says what it emulates (and that it fakes the operator). The
emulator validates every ray.io object it is sent against KubeRay's CRD schema, so the tests that send one take the
kuberay_crds fixture (they skip where no copy of the CRDs is found); the others run everywhere.
"""

from __future__ import annotations

import shlex
import socket
from pathlib import Path

import pytest
import yaml
from k8s_emulator import ApiServerEmulator, pod_templates, rule_violations, schema_errors
from pod_security import restricted_violations

from metascale.config import load_spec, parse_spec
from metascale.submit.kuberay import KubeRayJobs
from metascale.submit.package import prepare
from metascale.submit.rayjob import rayjob
from metascale.errors import ClusterError
from metascale.submit.targets import K8sTarget

TOKEN = "s3cret-token-do-not-print"
NS = "team-a"
# The fixed argument vector of every submitted job: --auto-resume, so that a retry continues from its checkpoints.
ENTRYPOINT = ["metascale", "run", "/etc/metascale/metascale-job.yaml", "--auto-resume"]


@pytest.fixture(scope="module")
def emu():
    with ApiServerEmulator(TOKEN, forbidden_namespaces=frozenset({"locked"})) as server:
        yield server


@pytest.fixture
def env(emu, tmp_path, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(emu.kubeconfig(tmp_path / "kubeconfig")))
    monkeypatch.setenv("METASCALE_STATE_DIR", str(tmp_path / "state"))
    emu.requests.clear()
    return tmp_path


@pytest.fixture
def spec(tmp_path) -> Path:
    path = tmp_path / "e2e.yaml"
    path.write_text(
        "name: e2e\nouter: {steps: 3, meta_batch: 2}\nlogging: {wandb: {mode: disabled}}\n"
        "checkpoint: {dir: 's3://bucket/{name}'}\n"
    )
    return path


def _restricted(obj: dict) -> list[str]:
    return [f"{where}: {p}" for where, pod in pod_templates(obj) for p in restricted_violations(pod)]


@pytest.mark.usefixtures("kuberay_crds")
def test_submit_status_logs_list_cancel(env, emu, spec, cli):
    code, out, err = cli("submit", str(spec), "--to", f"k8s://emu/{NS}", "--set", "seed=7")
    assert code == 0, err
    job_id = out.strip()
    job = emu.objects[("rayjobs", NS, job_id)]
    cm = emu.objects[("configmaps", NS, f"{job_id}-spec")]
    assert schema_errors(job) == [] and schema_errors(cm) == []
    assert shlex.split(job["spec"]["entrypoint"]) == ENTRYPOINT
    assert job["spec"]["jobId"] == job_id  # `ray job status ID` on the cluster names the same job
    assert rule_violations(job) == [] and _restricted(job) == []
    assert [w for w, _ in pod_templates(job)] == [
        "submitterPodTemplate",
        "headGroupSpec.template",
        "workerGroupSpecs[0].template",
    ]
    assert job["spec"]["shutdownAfterJobFinishes"] is True and job["spec"]["backoffLimit"] == 2  # retries resume
    # The spec travels resolved (override applied, 'local' Ray -> join the cluster) and loads back.
    sent = parse_spec(yaml.safe_load(cm["data"]["metascale-job.yaml"]))
    assert sent.seed == 7 and sent.cluster.address == "auto"
    assert sent.model_copy(update={"cluster": sent.cluster.model_copy(update={"address": "local"})}) == load_spec(
        spec, ["seed=7"]
    )
    assert cm["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"]

    assert cli("status", job_id)[1].split("\t")[:3] == [job_id, "PENDING", "e2e"]
    emu.operator_step(NS, job_id, "RUNNING", "Running", log="step 1/3 loss 2.1\nstep 2/3 loss 1.7\n")
    assert cli("status", job_id)[1].split("\t")[1] == "RUNNING"
    code, out, _ = cli("logs", job_id)
    assert code == 0 and "step 2/3 loss 1.7" in out
    code, out, _ = cli("logs", job_id, "--follow")
    assert code == 0 and "step 1/3" in out
    assert job_id in cli("list")[1]

    # cancel suspends the RayJob (KubeRay then deletes its cluster and submitter pod) and keeps its record and log.
    code, _, err = cli("cancel", job_id)
    assert code == 0 and "suspended" in err, err
    job = emu.objects[("rayjobs", NS, job_id)]
    assert job["spec"]["suspend"] is True and ("configmaps", NS, f"{job_id}-spec") in emu.objects
    assert [m for m, u in emu.requests if m == "PATCH"] and not [m for m, u in emu.requests if m == "DELETE"]
    emu.operator_suspend(NS, job_id)
    assert not [k for k in emu.objects if k[0] == "pods"]  # the log is gone from the cluster
    code, out, _ = cli("status", job_id)
    assert code == 0 and out.split("\t")[:3] == [job_id, "STOPPED", "e2e"] and "cancelled: Suspended" in out
    code, out, _ = cli("logs", job_id)
    assert code == 0 and out == "step 1/3 loss 2.1\nstep 2/3 loss 1.7\n"  # saved by cancel
    code, out, _ = cli("logs", job_id, "--follow")
    assert code == 0 and "step 2/3" in out
    code, _, err = cli("cancel", job_id)
    assert code == 0 and "already ended (STOPPED)" in err


@pytest.mark.usefixtures("kuberay_crds")
@pytest.mark.parametrize("how", ["cluster", "queue"])
def test_cancel_deletes_what_kuberay_or_kueue_would_not_suspend(env, emu, spec, cli, how):
    """KubeRay refuses suspend on an existing RayCluster, and Kueue owns a queued job's spec.suspend: cancel deletes
    those RayJobs (KubeRay's finalizer stops the Ray job), after saving the log and the state locally."""
    code, out, err = cli("submit", str(spec), "--to", f"k8s://{NS}", f"--{how}", "team")
    assert code == 0, err
    job_id = out.strip()
    emu.operator_step(NS, job_id, "RUNNING", "Running", log="step 1/3 loss 2.1\n")
    code, _, err = cli("cancel", job_id)
    assert code == 0 and "deleted its RayJob" in err
    assert ("rayjobs", NS, job_id) not in emu.objects
    code, out, _ = cli("status", job_id)
    assert code == 0 and out.split("\t")[1] == "STOPPED" and "was RUNNING" in out and "local record" in out
    assert cli("logs", job_id)[1] == "step 1/3 loss 2.1\n"


@pytest.mark.usefixtures("kuberay_crds")
def test_duplicate_is_a_clear_409(env, emu, spec):
    backend = KubeRayJobs(K8sTarget(NS, "emu"))
    job = prepare(spec)
    backend.submit(job)
    with pytest.raises(ClusterError, match=rf"^RayJob {job.job_id} already exists in namespace {NS} "):
        backend.submit(job)


@pytest.mark.usefixtures("kuberay_crds")
def test_invalid_object_is_a_clear_422_and_leaves_nothing(env, emu, spec):
    backend = KubeRayJobs(K8sTarget(NS))
    job = prepare(spec, ["kubernetes.volumes=[{name: x, csi: {}}]"])  # Kubernetes checks its own objects
    with pytest.raises(ClusterError, match=rf"^the API server rejected RayJob {job.job_id} as invalid: .*driver"):
        backend.submit(job)
    assert not [k for k in emu.objects if job.job_id in k[2]]


@pytest.mark.usefixtures("kuberay_crds")
def test_unknown_field_is_rejected_by_strict_field_validation(env, emu, spec, monkeypatch):
    import metascale.submit.kuberay as kuberay

    def with_typo(*args, **kwargs):
        obj = kuberay.rayjob.__wrapped__(*args, **kwargs)
        obj["spec"]["entryPoint"] = obj["spec"].pop("entrypoint")
        return obj

    with_typo.__wrapped__ = kuberay.rayjob
    monkeypatch.setattr(kuberay, "rayjob", with_typo)
    with pytest.raises(ClusterError, match=r"rejected RayJob .* as invalid: strict decoding error: .*entryPoint"):
        KubeRayJobs(K8sTarget(NS)).submit(prepare(spec))


@pytest.mark.usefixtures("kuberay_crds")
def test_dry_run_creates_nothing(env, emu, spec, cli):
    before = set(emu.objects)
    code, out, err = cli("submit", str(spec), "--to", f"k8s://{NS}", "--dry-run")
    assert code == 0 and "nothing was created" in err and out == ""
    assert [m for m, u in emu.requests if m == "POST" and "dryRun=All" in u] and len(emu.requests) == 2
    assert set(emu.objects) == before


@pytest.mark.usefixtures("kuberay_crds")
def test_a_sharded_job_submits_with_a_pod_per_rank_group(env, emu, cli):
    """The sharded example: 2 rank groups of 4 ranks, one GPU a rank. Each worker pod holds a whole group (its
    STRICT_PACK placement needs one node); with span_nodes, a pod per rank. The head (the driver) has no GPU."""
    code, out, err = cli("submit", "jobs/vit-large-zero3.yaml", "--to", f"k8s://{NS}", "--dry-run")
    assert code == 0 and "nothing was created" in err, err
    cluster = rayjob(prepare("jobs/vit-large-zero3.yaml"), NS)["spec"]["rayClusterSpec"]
    [group] = cluster["workerGroupSpecs"]
    requests = group["template"]["spec"]["containers"][0]["resources"]["requests"]
    assert group["replicas"] == 2 and requests["nvidia.com/gpu"] == "4" and requests["cpu"] == "32"
    assert (
        "nvidia.com/gpu" not in cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["requests"]
    )
    spanning = rayjob(prepare("jobs/vit-large-zero3.yaml", ["sharding.span_nodes=true"]), NS)
    [group] = spanning["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert (
        group["replicas"] == 8
        and group["template"]["spec"]["containers"][0]["resources"]["requests"]["nvidia.com/gpu"] == "1"
    )


def test_forbidden_is_one_line_without_secrets(env, emu, spec, cli):
    code, out, err = cli("submit", str(spec), "--to", "k8s://locked")
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: forbidden: rayjobs.ray.io is forbidden")
    assert TOKEN not in err and "Traceback" not in err


def test_unauthorized_and_unreachable(env, emu, spec, tmp_path, monkeypatch, cli):
    kubeconfig = yaml.safe_load(Path(env / "kubeconfig").read_text())
    kubeconfig["users"][0]["user"]["token"] = "wrong-token"
    (tmp_path / "bad").write_text(yaml.safe_dump(kubeconfig))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "bad"))
    code, _, err = cli("submit", str(spec), "--to", f"k8s://{NS}")
    assert code == 1 and err.startswith("error: unauthorized by the API server") and "wrong-token" not in err

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    kubeconfig["clusters"][0]["cluster"]["server"] = f"http://127.0.0.1:{port}"
    (tmp_path / "closed").write_text(yaml.safe_dump(kubeconfig))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "closed"))
    code, _, err = cli("submit", str(spec), "--to", f"k8s://{NS}")
    assert code == 1 and err.startswith("error: cannot reach the Kubernetes API server for k8s://team-a")
    assert err.count("\n") == 1

    code, _, err = cli("submit", str(spec), "--to", "k8s://no-such-context/team-a")
    assert code == 1 and err.startswith("error: cannot load the kubeconfig for k8s://no-such-context/team-a")


def test_invalid_spec_sends_nothing(env, emu, tmp_path, cli):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: e2e\nouter: {stepz: 3}\n")
    code, _, err = cli("submit", str(bad), "--to", f"k8s://{NS}")
    assert code == 2 and "outer.stepz: unknown field" in err
    assert emu.requests == []


def test_no_injection_through_the_job_name(env, emu, tmp_path, cli):
    evil_name = tmp_path / "x'; touch pwned; echo '.yaml"
    evil_name.write_text("name: 'e2e; rm -rf /'\n")
    code, _, err = cli("submit", str(evil_name), "--to", f"k8s://{NS}")
    assert code == 2 and "name: String should match pattern" in err and emu.requests == []


@pytest.mark.usefixtures("kuberay_crds")
def test_no_injection_through_paths_or_values(env, emu, tmp_path, cli):
    evil_name = tmp_path / "x'; touch pwned; echo '.yaml"
    evil_name.write_text("name: e2e\nouter: {steps: 3}\n")
    code, out, err = cli(
        "submit",
        str(evil_name),
        "--to",
        f"k8s://{NS}",
        "--set",
        "logging.wandb.project=$(touch pwned); x`id`",
        "--allow-ephemeral",
    )
    assert code == 0, err
    job = emu.objects[("rayjobs", NS, out.strip())]
    assert shlex.split(job["spec"]["entrypoint"]) == ENTRYPOINT
    sent = yaml.safe_load(emu.objects[("configmaps", NS, f"{out.strip()}-spec")]["data"]["metascale-job.yaml"])
    assert sent["logging"]["wandb"]["project"] == "$(touch pwned); x`id`"  # data in a file, never in a command
    assert "pwned" not in yaml.safe_dump(job)


@pytest.mark.usefixtures("kuberay_crds")
def test_wandb_key_is_a_secret_reference(env, emu, spec):
    job = prepare(spec, ["kubernetes.wandb_secret=team-wandb"])
    KubeRayJobs(K8sTarget(NS)).submit(job)
    obj = emu.objects[("rayjobs", NS, job.job_id)]
    cluster = obj["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        env_vars = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
        assert env_vars["WANDB_API_KEY"] == {
            "name": "WANDB_API_KEY",
            "valueFrom": {"secretKeyRef": {"name": "team-wandb", "key": "api-key", "optional": True}},
        }
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True


FULL = """
name: e2e
outer: {steps: 3}
checkpoint: {dir: '/mnt/runs/{name}/ckpt'}
logging: {wandb: {mode: offline, dir: '/mnt/runs/{name}'}}
cluster: {workers: 2, cpus_per_process: 2, gpus_per_process: 1}
kubernetes:
  image: registry.example.com/ml/metascale:0.1.0
  head: {cpu: 1500m, memory: 6Gi}
  worker: {cpu: "3", memory: 16Gi}
  nodeSelector: {cloud.google.com/gke-accelerator: nvidia-l4, pool: gpu}
  tolerations: [{key: dedicated, operator: Equal, value: ml, effect: NoSchedule}]
  serviceAccountName: ray-s3
  imagePullSecrets: [{name: regcred}]
  volumes:
    - {name: runs, persistentVolumeClaim: {claimName: metascale-runs}}
    - {name: scratch, emptyDir: {sizeLimit: 20Gi}}
    - {name: cache, ephemeral: {volumeClaimTemplate: {spec: {accessModes: [ReadWriteOnce], resources: {requests: {storage: 1Gi}}}}}}
  volumeMounts:
    - {name: runs, mountPath: /mnt/runs}
    - {name: scratch, mountPath: /scratch}
    - {name: cache, mountPath: /home/ray/.cache, readOnly: false}
  priorityClassName: ml-high
  ttlSecondsAfterFinished: 600
  wandb_secret: team-wandb
  backoffLimit: 1
"""


@pytest.mark.usefixtures("kuberay_crds")
def test_every_kubernetes_field_reaches_valid_restricted_pods(env, emu, tmp_path, cli):
    """Every field of the kubernetes: section, through the real client: the API server (KubeRay's CRD schema and
    Kubernetes' Pod schema, strict) accepts the RayJob, and every pod passes the restricted profile."""
    path = tmp_path / "full.yaml"
    path.write_text(FULL)
    code, out, err = cli("submit", str(path), "--to", f"k8s://{NS}")
    assert code == 0, err
    job = emu.objects[("rayjobs", NS, out.strip())]
    assert schema_errors(job) == [] and rule_violations(job) == [] and _restricted(job) == []
    spec = job["spec"]
    assert spec["ttlSecondsAfterFinished"] == 600 and spec["backoffLimit"] == 1
    pods = dict(pod_templates(job))
    for where, pod in pods.items():
        assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4", "pool": "gpu"}, where
        assert {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"} in pod["tolerations"]
        assert pod["imagePullSecrets"] == [{"name": "regcred"}] and pod["priorityClassName"] == "ml-high"
        assert pod["containers"][0]["image"] == "registry.example.com/ml/metascale:0.1.0"
    head, worker = pods["headGroupSpec.template"], pods["workerGroupSpecs[0].template"]
    assert head["containers"][0]["resources"]["limits"] == {"cpu": "1500m", "memory": "6Gi"}
    assert worker["containers"][0]["resources"]["limits"] == {"cpu": "3", "memory": "16Gi", "nvidia.com/gpu": "1"}
    assert spec["rayClusterSpec"]["workerGroupSpecs"][0]["rayStartParams"] == {"num-cpus": "2"}
    for pod in (head, worker):
        assert pod["serviceAccountName"] == "ray-s3"
        assert {"name": "runs", "persistentVolumeClaim": {"claimName": "metascale-runs", "readOnly": False}} in pod[
            "volumes"
        ]
        assert {"name": "runs", "mountPath": "/mnt/runs", "readOnly": False} in pod["containers"][0]["volumeMounts"]
        wandb = next(e for e in pod["containers"][0]["env"] if e["name"] == "WANDB_API_KEY")
        assert wandb["valueFrom"]["secretKeyRef"]["name"] == "team-wandb"
    assert "serviceAccountName" not in pods["submitterPodTemplate"]  # it only runs `ray job submit`


@pytest.mark.usefixtures("kuberay_crds")
def test_queue_puts_the_rayjob_in_kueue_suspended(env, emu, spec, cli):
    code, out, err = cli("submit", str(spec), "--to", f"k8s://{NS}", "--queue", "team-a-queue")
    assert code == 0, err
    job = emu.objects[("rayjobs", NS, out.strip())]
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a-queue" and job["spec"]["suspend"] is True
    assert job["spec"]["shutdownAfterJobFinishes"] is True and rule_violations(job) == []  # KubeRay's suspend rule
    code, out, _ = cli("status", out.strip())
    assert out.split("\t")[1] == "PENDING" and "queued in Kueue LocalQueue team-a-queue" in out


@pytest.mark.usefixtures("kuberay_crds")
def test_cluster_runs_on_an_existing_raycluster(env, emu, spec, cli):
    code, out, err = cli("submit", str(spec), "--to", f"k8s://{NS}", "--cluster", "ms-metascale")
    assert code == 0, err
    job = emu.objects[("rayjobs", NS, out.strip())]
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": "ms-metascale"}
    assert job["spec"]["backoffLimit"] == 0 and job["spec"]["jobId"] == out.strip()
    for absent in ("rayClusterSpec", "shutdownAfterJobFinishes", "ttlSecondsAfterFinished", "suspend"):
        assert absent not in job["spec"], absent
    assert schema_errors(job) == [] and rule_violations(job) == [] and _restricted(job) == []
    broken = {
        **job,
        "spec": {**job["spec"], "suspend": True, "backoffLimit": 2},
    }  # the rule checker sees KubeRay's rules
    assert len(rule_violations(broken)) == 3


@pytest.mark.parametrize(
    "args, message",
    [
        (["--queue", "q", "--cluster", "c"], "--queue and --cluster exclude each other"),
        (["--queue", "Team_Q"], "--queue 'Team_Q': expected a Kubernetes name"),
        (["--cluster", "c", "--to", "http://127.0.0.1:8265"], "apply to k8s:// targets only"),
    ],
)
def test_bad_queue_or_cluster_is_exit_2_before_any_request(env, emu, spec, cli, args, message):
    code, _, err = cli("submit", str(spec), "--to", f"k8s://{NS}", *args)
    assert code == 2 and message in err and err.count("\n") == 1 and emu.requests == []


def test_ephemeral_checkpoints_are_refused_before_any_request(env, emu, tmp_path, cli):
    path = tmp_path / "local.yaml"
    path.write_text("name: e2e\nlogging: {wandb: {mode: disabled}}\n")
    code, _, err = cli("submit", str(path), "--to", f"k8s://{NS}")
    assert code == 2 and err.count("\n") == 1 and emu.requests == []
    assert "checkpoint.dir (runs/e2e/checkpoints) would live only inside the job's pods" in err
    assert err.rstrip().endswith("or pass --allow-ephemeral")
