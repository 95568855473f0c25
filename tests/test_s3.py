"""Checkpoints and the lease on a real S3-compatible server: moto's server on 127.0.0.1, from its own venv
(scripts/moto-venv.sh), spoken to over HTTP by metascale's obstore-backed `s3://` filesystem (cluster/storage.py).
The same guarantees as on local disk: atomic (a checkpoint counts once its manifest is written), checksummed (a torn
upload is found and the previous checkpoint used), pruned, an exclusive lease (conditional PUT), and a job killed
with SIGKILL that `--auto-resume`s from the bucket ends bit-identical to an uninterrupted local run.

Where moto cannot be installed (no package registry) the tests skip with one line, except under CI, where they fail.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import torch
import yaml

from metascale.cluster import checkpoint
from metascale.cluster.lease import Lease
from metascale.cluster.lease_store import LeaseStore
from metascale.cluster.storage import S3FileSystem, url_to_fs
from metascale.errors import CheckpointError
from metascale.train import train

REPO = Path(__file__).resolve().parent.parent
MOTO_PYTHON = REPO / ".cache" / "moto-venv" / "bin" / "python"
INSTALL_S = 600  # scripts/moto-venv.sh from nothing: ~20-60 s here; a slow registry gets this long, then a skip
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def _unavailable(why: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"moto's S3 server is needed in CI: {why}")
    pytest.skip(f"no S3 test server (moto) here: {why}")


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    """moto's S3 server on 127.0.0.1 at a port the OS picks, for this module; ended by its pid."""
    try:
        done = subprocess.run(
            ["bash", str(REPO / "scripts" / "moto-venv.sh")], capture_output=True, text=True, timeout=INSTALL_S
        )
    except subprocess.TimeoutExpired:
        _unavailable(f"scripts/moto-venv.sh took over {INSTALL_S} s")
    if done.returncode != 0:
        said = (done.stderr.strip().splitlines() or ["no output"])[-1]
        _unavailable(f"scripts/moto-venv.sh exited {done.returncode}: {said}")
    log = tmp_path_factory.mktemp("moto") / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(MOTO_PYTHON), "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"], stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.time() + 60
        port = None
        while port is None and time.time() < deadline and proc.poll() is None:
            found = re.search(r"Running on http://127\.0\.0\.1:(\d+)", log.read_text())
            port = found and int(found.group(1))
            time.sleep(0.1)
        if port is None:
            _unavailable(f"moto's server did not start: {log.read_text()[-300:]}")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
def bucket(s3_endpoint, monkeypatch) -> str:
    """A new bucket on the server, with this process's environment pointing at it; its s3:// URL."""
    name = f"t-{uuid.uuid4().hex[:12]}"
    urllib.request.urlopen(urllib.request.Request(f"{s3_endpoint}/{name}", method="PUT"), timeout=30).close()
    for k, v in {**CREDENTIALS, "AWS_ENDPOINT_URL": s3_endpoint}.items():
        monkeypatch.setenv(k, v)
    return f"s3://{name}"


def _state(step: int, fill: float) -> dict:
    return {
        "step": step,
        "params": {"w": torch.full((4,), fill, dtype=torch.float64)},
        "rng": {"torch": torch.get_rng_state()},
        "spec": "name: t\n",
        "wandb_run_id": None,
        "skipped_steps": 0,
    }


def test_checkpoints_on_s3_are_folders_pruned_and_verified(bucket, caplog):
    d = f"{bucket}/runs/x/checkpoints"
    fs, root = url_to_fs(d)
    assert isinstance(fs, S3FileSystem)
    fs.pipe_file(f"{root}/.lease", b'{"token": "someone"}')
    for s in range(1, 5):
        path = checkpoint.save(d, s, _state(s, float(s)), keep=2)
    assert path == f"{d}/step-00000004" and checkpoint.list_steps(d) == [3, 4]
    assert sorted(fs.ls(root, detail=False)) == [f"{root}/.lease", f"{root}/step-00000003", f"{root}/step-00000004"]
    assert sorted(n.rsplit("/", 1)[1] for n in fs.ls(f"{root}/step-00000004", detail=False)) == [
        "manifest.json",
        "params.safetensors",
        "state.pt",
    ]
    step, state = checkpoint.load_latest(d)
    assert step == 4 and torch.equal(state["params"]["w"], torch.full((4,), 4.0, dtype=torch.float64))

    # A torn upload: the newest checkpoint's parameters cut short in the bucket.
    key = f"{root}/step-00000004/params.safetensors"
    fs.pipe_file(key, fs.cat_file(key)[:50])
    with caplog.at_level(logging.WARNING):
        step, state = checkpoint.load_latest(d)
    assert step == 3 and float(state["params"]["w"][0]) == 3.0
    assert "params.safetensors has 50 bytes, its manifest says" in caplog.text
    # A flipped byte is a checksum mismatch.
    blob = bytearray(fs.cat_file(f"{root}/step-00000003/state.pt"))
    blob[-1] ^= 0xFF
    fs.pipe_file(f"{root}/step-00000003/state.pt", bytes(blob))
    with pytest.raises(CheckpointError, match="state.pt: checksum mismatch"):
        checkpoint.read(f"{d}/step-00000003")

    # An upload killed before its manifest: no checkpoint; the next save writes the step anew and clears the rest.
    fs.pipe_file(f"{root}/step-00000005/params.safetensors", b"half an upload")
    assert checkpoint.list_steps(d) == [3, 4]
    checkpoint.save(d, 4, _state(4, 4.5), keep=1)  # step 4 again, whole: its old manifest goes first
    assert checkpoint.list_steps(d) == [4] and float(checkpoint.load_latest(d)[1]["params"]["w"][0]) == 4.5
    assert sorted(fs.ls(root, detail=False)) == [f"{root}/.lease", f"{root}/step-00000004"]


def test_the_lease_is_exclusive_on_s3(bucket):
    d = f"{bucket}/leased"
    store = LeaseStore(d)
    assert store.conditional  # obstore's create is a conditional PUT: no read-back window
    # Eight threads create one name at once: the server lets exactly one in (If-None-Match: *).
    results: list[bool] = []
    barrier = threading.Barrier(8)

    def create(i: int) -> None:
        barrier.wait()
        results.append(store.create("race", f"{i}".encode()))

    threads = [threading.Thread(target=create, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 7 + [True]
    with Lease.acquire(d, owner="first run") as lease:
        with pytest.raises(CheckpointError, match="is in use by run first run"):
            Lease.acquire(d, owner="second run")
        lease.check(reread=True)
        assert lease.renew()
    with Lease.acquire(d, owner="third run"):  # released: free again
        pass


def _spec_file(make_job, tmp_path: Path, name: str, **kw):
    settings = {"outer__steps": 24, "eval__every": 0, "checkpoint__every": 2, "cluster__workers": 1, **kw}
    spec = make_job(tmp_path / name, **settings)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    return spec, path


def _run(path: Path, endpoint: str, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", **CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}
    return subprocess.Popen(
        [sys.executable, "-m", "metascale", "run", str(path), *extra],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_a_job_killed_mid_run_auto_resumes_from_s3_past_a_torn_upload_and_matches_a_local_run(
    bucket, s3_endpoint, tmp_path, make_job, kill_tree
):
    clean, _ = _spec_file(make_job, tmp_path, "clean", cluster__address="inline")
    train(clean)
    reference = checkpoint.load_latest(clean.path(clean.checkpoint.dir))[1]["params"]

    d = f"{bucket}/jobs/killed/checkpoints"
    _, path = _spec_file(make_job, tmp_path, "killed", checkpoint__dir=d)
    proc = _run(path, s3_endpoint, "--auto-resume")  # the first attempt: an empty bucket, a fresh start
    deadline = time.time() + 300
    while time.time() < deadline and not [s for s in checkpoint.list_steps(d) if s >= 6]:
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    kill_tree(proc)
    steps = checkpoint.list_steps(d)
    assert 6 <= steps[-1] < 24, "the kill must land mid-run"

    # The newest checkpoint's optimiser state arrived torn: the retry must notice and take the one before.
    fs, root = url_to_fs(d)
    key = f"{root}/{checkpoint.step_name(steps[-1])}/state.pt"
    fs.pipe_file(key, fs.cat_file(key)[:-10])
    resumed = _run(path, s3_endpoint, "--auto-resume")  # the lease of the killed run is taken over (its pid is gone)
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    assert "skipping checkpoint" in out and "state.pt has" in out, out[-3000:]
    got = checkpoint.load_latest(d)
    assert got[0] == 24
    for k in reference:
        assert torch.equal(reference[k], got[1]["params"][k]), k
    assert checkpoint.list_steps(d) == [20, 22, 24]  # keep: 3
    assert [n.rsplit("/", 1)[1] for n in fs.ls(root, detail=False) if n.endswith(".lease")] == []  # released
