"""How a run stops, and that it loses nothing when it does: Ctrl-C checkpoints like SIGTERM, a second run of the same
job is refused by the first one's lease, a run that has diverged stops, an unwritable checkpoint directory ends the
run with one line naming the last saved step, a checkpoint that does not fit the job is refused, a worker's data
error is one line, and a split that cannot make the episodes fails before any training."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from metascale.cluster import checkpoint
from metascale.cluster.coordinator import NonFiniteError
from metascale.errors import CheckpointError, DataError
from metascale.train import train


def _run(path: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "metascale", "run", str(path), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "RAY_AUTH_MODE": "disabled"},
    )


def _spec_file(make_job, tmp_path: Path, name: str, **kw) -> tuple[object, Path]:
    spec = make_job(tmp_path / name, **{"eval__every": 0, "cluster__address": "inline", **kw})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    return spec, path


def _wait_for_step(proc: subprocess.Popen) -> None:
    deadline = time.time() + 300
    while time.time() < deadline:
        line = proc.stdout.readline()
        assert line or proc.poll() is None, proc.stderr.read()
        if line.startswith("step "):
            return
    raise AssertionError("no meta-step within 300 s")


def test_ctrl_c_checkpoints_like_sigterm_and_resume_equals_an_uninterrupted_run(tmp_path, make_job, same_final_params):
    clean, _ = _spec_file(make_job, tmp_path, "clean", outer__steps=60, checkpoint__every=0)
    train(clean)
    spec, path = _spec_file(make_job, tmp_path, "interrupted", outer__steps=60, checkpoint__every=0)
    proc = _run(path)
    _wait_for_step(proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    stopped = json.loads(out.strip().splitlines()[-1])
    assert stopped["status"] == "stopped" and stopped["signal"] == "SIGINT" and 0 < stopped["step"] < 60
    assert "Ctrl-C again to exit at once" in err
    assert checkpoint.list_steps(spec.path(spec.checkpoint.dir)) == [stopped["step"]]
    resumed = _run(path, "--resume")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    same_final_params(clean, spec)


def test_a_second_run_of_the_same_job_is_refused_and_overwrites_nothing(tmp_path, make_job):
    spec, path = _spec_file(make_job, tmp_path, "job", outer__steps=400, checkpoint__every=50)
    first = _run(path)
    _wait_for_step(first)  # it holds the directory's lease
    second = _run(path)
    out, err = second.communicate(timeout=300)
    assert second.returncode == 2 and "Traceback" not in err
    assert f"pid {first.pid}" in err and "is in use by run" in err and len(err.strip().splitlines()) == 1
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    assert json.loads(out.strip().splitlines()[-1])["step"] == 400
    assert checkpoint.list_steps(spec.path(spec.checkpoint.dir))[-1] == 400


def test_a_run_that_diverges_stops_after_max_skipped_steps_with_a_checkpoint(tmp_path):
    from metascale.config import parse_spec

    spec = parse_spec(
        {  # sinusoid MAML: one Adam step of 1e9 and every task is non-finite from then on
            "outer": {"lr": 1e9, "steps": 50, "meta_batch": 4},
            "eval": {"every": 0},
            "cluster": {"address": "inline"},
            "checkpoint": {"dir": str(tmp_path / "ckpt"), "every": 0},
            "logging": {"wandb": {"mode": "disabled"}},
        }
    )
    with pytest.raises(NonFiniteError, match="the last 3 meta-steps .* were all skipped") as e:
        train(spec)
    assert "executor.nonfinite=skip_task" in str(e.value) and "\n" not in str(e.value)
    [step] = checkpoint.list_steps(spec.path(spec.checkpoint.dir))
    assert step == 4 and checkpoint.load_latest(spec.path(spec.checkpoint.dir))[1]["skipped_steps"] == 3


def _make_unwritable(directory: Path) -> bool:
    """chmod where it binds (not root); as root, the immutable flag; False where neither can be set."""
    if os.geteuid() != 0:
        directory.chmod(0o555)
        return True
    return subprocess.run(["chattr", "+i", str(directory)], capture_output=True).returncode == 0


def _make_writable(directory: Path) -> None:
    if os.geteuid() != 0:
        directory.chmod(0o755)
    else:
        subprocess.run(["chattr", "-i", str(directory)], check=True)


def test_an_unwritable_checkpoint_directory_ends_the_run_naming_the_last_saved_step(tmp_path, make_job):
    spec, path = _spec_file(make_job, tmp_path, "job", outer__steps=30, checkpoint__every=1)
    directory = Path(spec.path(spec.checkpoint.dir))
    locked: list[list[int]] = []

    def lock():
        deadline = time.time() + 120
        while time.time() < deadline and 3 not in checkpoint.list_steps(str(directory)):
            time.sleep(0.01)
        if _make_unwritable(directory):
            locked.append(checkpoint.list_steps(str(directory)))

    thread = threading.Thread(target=lock, daemon=True)
    thread.start()
    try:
        proc = _run(path)
        out, err = proc.communicate(timeout=300)
    finally:
        thread.join()
        if locked:
            _make_writable(directory)
    if not locked:
        pytest.skip("cannot make a directory unwritable here (root without chattr)")
    last = checkpoint.list_steps(str(directory))[-1]
    assert proc.returncode == 3 and "Traceback" not in err, err[-3000:]
    [line] = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert f"the last saved checkpoint is step {last}" in line and last >= max(locked[0])
    assert checkpoint.load_latest(str(directory))[0] == last  # everything before the failure is there and reads
    again = _run(path, "--resume")  # a new process: it takes the failed run's lease over at once (its pid is gone)
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-3000:]
    assert json.loads(out.strip().splitlines()[-1])["step"] == 30


def test_a_checkpoint_of_another_model_is_refused_by_eval_and_resume(tmp_path, make_job):
    spec, path = _spec_file(make_job, tmp_path, "job", outer__steps=2)
    train(spec)
    for args in (
        ["eval", str(path), "--set", "model.hidden=16"],
        ["eval", str(path), "--set", "data.ways=4"],
        ["run", str(path), "--resume", "--set", "model.hidden=16"],
    ):
        out = subprocess.run([sys.executable, "-m", "metascale", *args], capture_output=True, text=True, timeout=300)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        [line] = out.stderr.strip().splitlines()
        assert "the checkpoint does not fit this job's model" in line
        assert ("model.hidden (8 in the checkpoint, 16 here)" in line) or ("data.ways (3 in the checkpoint" in line)
    with pytest.raises(CheckpointError, match="model.hidden"):
        train(make_job(tmp_path / "job", outer__steps=3, model__hidden=16, cluster__address="inline"), resume=True)


def test_a_split_that_cannot_make_the_episodes_fails_before_training(tmp_path, make_job):
    spec = make_job(tmp_path, data__classes=6, data__ways=5, cluster__address="inline")  # 6 classes over 3 splits
    with pytest.raises(DataError, match="split"):
        train(spec)
    assert not checkpoint.list_steps(spec.path(spec.checkpoint.dir))


def test_a_workers_data_error_is_one_line_without_rays_traceback(tmp_path, make_job, local_ray):
    from metascale.data.pack import SourceClass, pack

    rng = np.random.default_rng(0)
    classes = [
        SourceClass(f"k{c}", f"k{c}", split, list(rng.integers(0, 256, (4, 28, 28), dtype=np.uint8)))
        for c, split in enumerate(["train"] * 6 + ["val"] * 3 + ["test"] * 3)
    ]
    pack(classes, tmp_path / "set", progress=False, max_classes_per_shard=3)
    shard = tmp_path / "set" / "train-00001.tar"
    shard.write_bytes(shard.read_bytes()[:1500])  # torn: the replica finds it when it reads the shard
    spec = make_job(
        tmp_path,
        data={"source": "shards", "url": str(tmp_path / "set"), "ways": 3, "shots": 1, "queries": 1},
        outer__steps=2,
        eval__every=0,
    )
    with pytest.raises(DataError) as e:
        train(spec)
    assert "train-00001.tar" in str(e.value) and "\n" not in str(e.value) and "ray::" not in str(e.value)
