"""Cluster verbs never hang, and an address that is not a cluster is one line: loopback servers that accept and
never answer, plain HTTP servers that are not Ray, and follow streams that go quiet (fake clients, no cluster)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
import yaml
from urllib3.exceptions import ReadTimeoutError

from metascale.errors import ClusterError
from metascale.submit import backend
from metascale.submit.kuberay import KubeRayJobs
from metascale.submit.ray_jobs import RayJobs
from metascale.submit.targets import K8sTarget, RayTarget

READ_S = 1.0  # the read timeout these tests run under (60 s in use)


@pytest.fixture(autouse=True)
def short_timeouts(monkeypatch, tmp_path):
    monkeypatch.setattr(backend, "CONNECT_TIMEOUT_S", 2.0)
    monkeypatch.setattr(backend, "READ_TIMEOUT_S", READ_S)
    monkeypatch.setenv("METASCALE_STATE_DIR", str(tmp_path / "state"))


@pytest.fixture
def silent_server():
    """A loopback port that accepts every connection and never sends a byte; returns its http:// URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.settimeout(0.2)
    held, stop = [], threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                held.append(sock.accept()[0])
            except (socket.timeout, OSError):
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    stop.set()
    thread.join(timeout=5)
    for conn in held:
        conn.close()
    sock.close()


@pytest.fixture
def spec(tmp_path) -> Path:
    path = tmp_path / "e2e.yaml"
    path.write_text("name: e2e\nouter: {steps: 3, meta_batch: 2}\nlogging: {wandb: {mode: disabled}}\n")
    return path


def _one_line(code: int, err: str, expected_code: int, needle: str) -> None:
    assert code == expected_code and err.startswith("error: ") and err.count("\n") == 1, (code, err)
    assert needle in err and "Traceback" not in err, err


def test_ray_verbs_against_a_server_that_never_answers_fail_within_the_timeout(cli, spec, silent_server):
    for args in (
        ["submit", str(spec), "--to", silent_server],
        ["status", "e2e-abc123", "--to", silent_server],
        ["logs", "e2e-abc123", "--follow", "--to", silent_server],
    ):
        start = time.monotonic()
        code, _, err = cli(*args)
        assert time.monotonic() - start < 10 * READ_S, args
        _one_line(code, err, 1, f"the Ray cluster at {silent_server} did not answer within 1 s")


@pytest.mark.parametrize(
    "files, problem",
    [
        ({}, "GET /api/version: 404"),
        ({"api/version": "<html><body>Jenkins</body></html>"}, "GET /api/version: not Ray's answer, JSONDecodeError"),
        ({"api/version": '{"version": "1.0"}'}, "GET /api/version: not Ray's answer, KeyError"),
        ({"api/version": '["ray_version"]'}, "GET /api/version: not Ray's answer, TypeError"),
    ],
    ids=["404", "html", "json-without-ray_version", "json-list"],
)
def test_an_http_server_that_is_not_ray_is_a_wrong_address(cli, spec, tmp_path, http_server, files, problem):
    root = tmp_path / "www"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    root.mkdir(exist_ok=True)
    url = http_server(root)
    for args in (["submit", str(spec), "--to", url], ["status", "e2e-abc123", "--to", url]):
        code, _, err = cli(*args)
        _one_line(code, err, 2, f"{url} answers HTTP but is not a Ray dashboard ({problem}); --to takes the Ray")


def test_kubernetes_calls_against_a_server_that_never_answers_fail_within_the_timeout(
    cli, tmp_path, monkeypatch, silent_server
):
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "silent",
        "clusters": [{"name": "silent", "cluster": {"server": silent_server}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "silent", "context": {"cluster": "silent", "user": "u"}}],
    }
    (tmp_path / "kubeconfig").write_text(yaml.safe_dump(config))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kubeconfig"))
    start = time.monotonic()
    code, _, err = cli("status", "e2e-abc123", "--to", "k8s://ml")
    assert time.monotonic() - start < 10 * READ_S  # one retry: two read timeouts
    _one_line(code, err, 1, "the Kubernetes API server for k8s://ml did not answer within 1 s")


# ------------------------------------------------------------------------------- follow streams that go quiet
class FakeRayClient:
    """Ray's client as `logs --follow` uses it: the websocket tail yields `chunks`, then stays open and silent."""

    def __init__(self, chunks: list[str], statuses: list[str | Exception]):
        self.chunks, self.statuses = chunks, statuses

    async def tail_job_logs(self, job_id: str):
        for chunk in self.chunks:
            yield chunk
        await asyncio.Event().wait()  # a stream nobody closes

    def get_job_info(self, job_id: str):
        status = self.statuses.pop(0)
        if isinstance(status, Exception):
            raise status
        return SimpleNamespace(submission_id=job_id, job_id=None, metadata={}, status=status, message="")


def _ray_jobs(client: FakeRayClient) -> RayJobs:
    jobs = RayJobs(RayTarget("http://127.0.0.1:8265"))
    jobs._client = client
    return jobs


def test_ray_follow_of_a_finished_job_whose_stream_stays_open_ends():
    client = FakeRayClient(["step 1/3\n", "step 3/3\n"], ["RUNNING", "SUCCEEDED"])
    got: list[str] = []
    start = time.monotonic()
    _ray_jobs(client).logs("e2e-abc123", follow=True, emit=got.append)
    assert got == ["step 1/3\n", "step 3/3\n"] and time.monotonic() - start < 5 * READ_S


def test_ray_follow_waits_for_a_quiet_running_job_and_fails_when_the_cluster_stops_answering():
    client = FakeRayClient(["step 1/3\n"], ["RUNNING", "RUNNING", requests.ReadTimeout("read timed out")])
    got: list[str] = []
    with pytest.raises(ClusterError, match=r"^the Ray cluster at http://127.0.0.1:8265 did not answer within 1 s"):
        _ray_jobs(client).logs("e2e-abc123", follow=True, emit=got.append)
    assert got == ["step 1/3\n"] and client.statuses == []  # asked twice after the first check: waited, then failed


class FakePodLog:
    """urllib3's streamed response: `chunks`, then either the end of the stream or a read timeout."""

    def __init__(self, chunks: list[bytes], then_timeout: bool):
        self.chunks, self.then_timeout = chunks, then_timeout

    def stream(self, amt: int):
        yield from self.chunks
        if self.then_timeout:
            raise ReadTimeoutError(None, None, "Read timed out.")

    def release_conn(self) -> None:
        pass


def test_k8s_follow_reopens_a_quiet_stream_from_the_middle_of_the_silence(monkeypatch):
    streams = [FakePodLog([b"step 1/3\n"], then_timeout=True), FakePodLog([b"step 2/3\n", b"step 3/3\n"], False)]
    calls: list[dict] = []

    def read_namespaced_pod_log(pod, ns, **kwargs):
        calls.append(kwargs)
        return streams.pop(0)

    jobs = KubeRayJobs(K8sTarget("ml"))
    monkeypatch.setattr(jobs, "status", lambda job_id: SimpleNamespace(status="RUNNING"))
    got: list[str] = []
    jobs._follow(
        SimpleNamespace(read_namespaced_pod_log=read_namespaced_pod_log), "e2e-abc123-x", "e2e-abc123", got.append
    )
    assert "".join(got) == "step 1/3\nstep 2/3\nstep 3/3\n"
    assert [c.get("since_seconds") for c in calls] == [None, 1]  # half of a 1 s read timeout, at least 1 s
    assert all(c["_request_timeout"] == (2.0, READ_S) and c["follow"] for c in calls)


def test_k8s_follow_of_a_finished_job_does_not_reopen(monkeypatch):
    streams = [FakePodLog([b"step 3/3\n"], then_timeout=True)]
    jobs = KubeRayJobs(K8sTarget("ml"))
    monkeypatch.setattr(jobs, "status", lambda job_id: SimpleNamespace(status="SUCCEEDED"))
    got: list[str] = []
    jobs._follow(
        SimpleNamespace(read_namespaced_pod_log=lambda pod, ns, **kw: streams.pop(0)), "p", "e2e-abc123", got.append
    )
    assert got == ["step 3/3\n"] and streams == []
