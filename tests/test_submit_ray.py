"""End to end against a real Ray head that this module starts on 127.0.0.1 (`ray start --head --block`) and ends by
its session's pids: submit a small job -> SUCCEEDED with its progress lines in `logs`; `cancel` stops a long one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from metascale.submit.package import prepare
from metascale.submit.ray_jobs import RayJobs
from metascale.errors import ClusterError
from metascale.submit.targets import RayTarget

VENV_BIN = Path(sys.executable).parent
SMALL = """name: e2e
algorithm: {inner: {lr: 0.01}}
outer: {steps: 3, meta_batch: 2}
eval: {every: 0, final_episodes: 10}
checkpoint: {every: 0}
logging: {wandb: {mode: disabled}, progress: true}
cluster: {workers: 1}
"""


def _session_pids(sid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[3]) == sid:  # after "pid (comm)": state ppid pgrp session
                pids.append(int(entry))
    return pids


@pytest.fixture(scope="module")
def ray_head(ray_head_ports):
    dash = ray_head_ports["dashboard-port"]
    tmp = tempfile.mkdtemp(prefix="msray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "RAY_TMPDIR": tmp,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        "PATH": f"{VENV_BIN}:{os.environ['PATH']}",  # the job's `metascale`
    }
    cmd = [
        str(VENV_BIN / "ray"),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        *[f"--{flag}={port}" for flag, port in ray_head_ports.items()],
        f"--temp-dir={tmp}",
        "--num-cpus=3",
        "--disable-usage-stats",
    ]
    log = open(Path(tmp) / "head.log", "w")
    head = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/version", timeout=2)
                break
            except OSError:
                assert head.poll() is None and time.time() < deadline, (Path(tmp) / "head.log").read_text()[-3000:]
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # the head's own process group; then any stragglers of its session
        try:
            head.wait(15)
        except subprocess.TimeoutExpired:
            pass
        for pid in _session_pids(head.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        head.wait(5)
        log.close()
        subprocess.run(["rm", "-rf", tmp], check=False)


@pytest.fixture
def state(tmp_path, monkeypatch):
    monkeypatch.setenv("METASCALE_STATE_DIR", str(tmp_path / "state"))


def _wait(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def test_submit_status_logs(ray_head, state, tmp_path, cli):
    spec = tmp_path / "e2e.yaml"
    spec.write_text(SMALL)
    code, out, err = cli("submit", str(spec), "--to", ray_head)
    assert code == 0, err
    job_id = out.strip()
    code, out, err = cli("status", job_id, "--wait", "--poll", "1")
    assert code == 0 and out.split("\t")[:3] == [job_id, "SUCCEEDED", "e2e"], out + err
    code, out, _ = cli("logs", job_id)
    assert code == 0
    assert "Running entrypoint for job" in out and "metascale run metascale-job.yaml --auto-resume" in out
    assert [ln for ln in out.splitlines() if ln.startswith("step ")][-1].startswith("step 3/3 ")
    assert '"status": "finished"' in out
    code, followed, _ = cli("logs", job_id, "--follow")  # a finished job's stream ends by itself
    assert code == 0 and "step 3/3 " in followed
    assert job_id in cli("list")[1]
    duplicate = prepare(spec)
    duplicate = type(duplicate)(job_id=job_id, spec=duplicate.spec, spec_yaml=duplicate.spec_yaml)
    with pytest.raises(ClusterError, match=f"^a job with ID {job_id} already exists on the Ray cluster at "):
        RayJobs(RayTarget(ray_head)).submit(duplicate)


def test_cancel_stops_a_long_job(ray_head, state, tmp_path, cli):
    spec = tmp_path / "long.yaml"
    spec.write_text(SMALL.replace("steps: 3", "steps: 1000000"))
    code, out, err = cli("submit", str(spec), "--to", ray_head)
    assert code == 0, err
    job_id = out.strip()
    backend = RayJobs(RayTarget(ray_head))
    _wait(lambda: "step " in backend._connect().get_job_logs(job_id), 90, "the long job's first progress line")
    code, _, err = cli("cancel", job_id)
    assert code == 0 and f"cancelled {job_id}" in err
    info = _wait(lambda: (i := backend.status(job_id)).status in ("STOPPED", "FAILED", "SUCCEEDED") and i, 60, "stop")
    assert info.status == "STOPPED"


def test_cluster_errors_are_one_line(ray_head, state, tmp_path, cli):
    code, _, err = cli("status", "no-such-job-abc123", "--to", ray_head)
    assert code == 1 and err == f"error: no job no-such-job-abc123 on the Ray cluster at {ray_head}\n"
    job = prepare(_write(tmp_path, SMALL))
    with pytest.raises(ClusterError, match="cannot reach the Ray cluster at http://127.0.0.1:1 "):
        RayJobs(RayTarget("http://127.0.0.1:1")).submit(job)
    before = len(RayJobs(RayTarget(ray_head)).list())
    code, _, err = cli("submit", str(tmp_path / "e2e.yaml"), "--to", ray_head, "--dry-run")
    assert code == 0 and "nothing was created" in err
    code, _, err = cli("submit", "jobs/vit-large-zero3.yaml", "--to", ray_head, "--dry-run")  # rank groups too
    assert code == 0 and "nothing was created" in err, err
    assert len(RayJobs(RayTarget(ray_head)).list()) == before
    code, _, err = cli("submit", str(tmp_path / "e2e.yaml"), "--to", "ftp://x")
    assert code == 2 and err.startswith("error: --to 'ftp://x': expected http(s)://HOST:8265")


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "e2e.yaml"
    path.write_text(text)
    return path
