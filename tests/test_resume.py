"""A coordinator killed with SIGKILL resumes from its last checkpoint with `metascale run --resume` (or
`--auto-resume`, which starts fresh when there is none) and ends with the same meta-parameters as an uninterrupted
run; the resumed job continues the same W&B run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
import yaml

from metascale.cluster import checkpoint
from metascale.errors import CheckpointError
from metascale.train import train
from wandb_records import history, run_files, run_id


def _spec_file(job, tmp_path, name, **kw):
    settings = {
        "outer__steps": 24,
        "eval__every": 0,
        "checkpoint__every": 2,
        "cluster__workers": 1,
        "logging__wandb": {"mode": "offline", "dir": str(tmp_path / name / "wb")},
        **kw,
    }
    spec = job(tmp_path / name, **settings)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    return spec, path


def _run(path, *extra):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    return subprocess.Popen(
        [sys.executable, "-m", "metascale", "run", str(path), *extra],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.parametrize("how", ["--resume", "--auto-resume"])
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, make_job, how, kill_tree):
    """`--resume`, and `--auto-resume` (what a submitted job runs, every attempt): the first attempt starts fresh in
    an empty directory, the one after the SIGKILL continues from the newest checkpoint."""
    # The reference runs in this process without Ray: one worker computes the same slot group either way.
    clean_spec, _ = _spec_file(
        make_job, tmp_path, "clean", cluster__address="inline", logging__wandb={"mode": "disabled"}
    )
    train(clean_spec)
    reference = checkpoint.load_latest(clean_spec.path(clean_spec.checkpoint.dir))[1]["params"]

    spec, path = _spec_file(make_job, tmp_path, "killed")
    ckpt_dir = spec.path(spec.checkpoint.dir)
    proc = _run(path, *([how] if how == "--auto-resume" else []))
    deadline = time.time() + 300
    while time.time() < deadline and not [s for s in checkpoint.list_steps(ckpt_dir) if s >= 4]:
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.1)
    kill_tree(proc)
    killed_at = checkpoint.list_steps(ckpt_dir)[-1]
    assert 4 <= killed_at < 24, "the kill must land mid-run"

    first_run = run_id(run_files(tmp_path / "killed" / "wb")[0])
    resumed = _run(path, how)
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    got = checkpoint.load_latest(ckpt_dir)[1]
    assert got["step"] == 24
    for k in reference:
        assert torch.equal(reference[k], got["params"][k]), k
    files = run_files(tmp_path / "killed" / "wb")
    assert {run_id(f) for f in files} == {first_run}, "the resumed job must continue the same W&B run"
    steps_logged = {row["_step"] for f in files for row in history(f) if "train/loss" in row}
    assert set(range(killed_at + 1, 25)) <= steps_logged


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path, make_job):
    _, path = _spec_file(make_job, tmp_path, "none")
    proc = _run(path, "--resume")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "no readable checkpoint" in out and "Traceback" not in out


def test_auto_resume_starts_fresh_in_an_empty_directory_and_continues_a_finished_run(tmp_path, make_job):
    steps = {"outer__steps": 4, "checkpoint__every": 2, "eval__every": 0, "cluster__address": "inline"}
    first = train(make_job(tmp_path, **steps), resume="auto")
    assert first["status"] == "finished" and first["step"] == 4
    again = train(make_job(tmp_path, **{**steps, "outer__steps": 6}), resume="auto")  # a longer run of the same job
    assert again["step"] == 6
    assert checkpoint.list_steps(str(tmp_path / "ckpt")) == [2, 4, 6]
    clean = make_job(tmp_path / "clean", **{**steps, "outer__steps": 6})
    train(clean)
    reference = checkpoint.load_latest(clean.path(clean.checkpoint.dir))[1]["params"]
    got = checkpoint.load_latest(str(tmp_path / "ckpt"))[1]["params"]
    for k in reference:
        assert torch.equal(reference[k], got[k]), k


def test_auto_resume_over_unreadable_checkpoints_is_an_error_not_a_fresh_start(tmp_path, make_job):
    """A directory whose checkpoints all fail to verify holds a run's history: starting over would prune it."""
    spec = make_job(tmp_path, outer__steps=2, checkpoint__every=1, eval__every=0, cluster__address="inline")
    train(spec)
    for step in checkpoint.list_steps(str(tmp_path / "ckpt")):
        (tmp_path / "ckpt" / checkpoint.step_name(step) / "state.pt").write_bytes(b"torn")
    with pytest.raises(CheckpointError, match="no readable checkpoint"):
        train(spec, resume="auto")
    assert checkpoint.list_steps(str(tmp_path / "ckpt")) == [1, 2]


def test_resume_and_auto_resume_together_are_refused_in_one_line(tmp_path, make_job):
    _, path = _spec_file(make_job, tmp_path, "both")
    proc = _run(path, "--resume", "--auto-resume")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "--auto-resume" in out and "Traceback" not in out, out


def test_sigterm_checkpoints_and_exits_cleanly(tmp_path, make_job):
    spec, path = _spec_file(make_job, tmp_path, "term", outer__steps=400, checkpoint__every=0)
    proc = _run(path)
    deadline = time.time() + 300
    while time.time() < deadline:  # wait until meta-steps are running
        line = proc.stdout.readline()
        if line.startswith("step "):
            break
    children = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    psutil.wait_procs(children, timeout=60)
    assert proc.returncode == 0, out
    steps = checkpoint.list_steps(spec.path(spec.checkpoint.dir))
    assert len(steps) == 1 and 0 < steps[0] < 400
