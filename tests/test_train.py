"""The training loop on real Ray: aggregation equals the single-process meta-gradient, faults cost time and not
results, checkpoints resume exactly, and the W&B offline run holds what was logged."""

from __future__ import annotations

import threading
import time

import pytest
import ray
import torch

from metascale.algorithms.executor import meta_gradient
from metascale.cluster import checkpoint
from metascale.cluster.coordinator import Coordinator, aggregate
from metascale.cluster.optim import lr_at
from metascale.cluster.pool import RayPool, split_slots
from metascale.cluster.worker import MetaWorker
from metascale.config import parse_spec
from metascale.errors import CheckpointError
from metascale.train import train
from wandb_records import run_files, run_id, settled_history


def job(tmp_path, **overrides):
    raw = {
        "name": "t",
        "model": {"name": "conv4", "hidden": 8},
        "data": {"source": "synthetic", "ways": 3, "shots": 1, "queries": 2, "classes": 20},
        "algorithm": {"name": "maml", "inner": {"steps": 2, "lr": 0.3}},
        "outer": {"meta_batch": 6, "steps": 6},
        "eval": {"every": 3, "episodes": 6, "final_episodes": 12},
        "checkpoint": {"dir": str(tmp_path / "ckpt"), "every": 2},
        "logging": {"wandb": {"mode": "disabled"}, "progress": False},
        "executor": {"dtype": "float64"},
        "cluster": {"workers": 2},
    }
    for dotted, value in overrides.items():
        node = raw
        *parents, last = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return parse_spec(raw)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def final_params(spec):
    step, state = checkpoint.load_latest(spec.path(spec.checkpoint.dir))
    assert step == spec.outer.steps
    return state["params"]


@pytest.mark.parametrize("algorithm", ["maml", "learned_hparams"])  # learned_hparams: 0-d meta-parameters
def test_aggregated_meta_gradient_equals_single_process(local_ray, tmp_path, algorithm):
    spec = job(tmp_path, outer__meta_batch=7, cluster__workers=3, algorithm__name=algorithm)
    coord = Coordinator(spec)
    pool = RayPool(spec)
    try:
        groups = split_slots(7, 3)
        assert [len(g) for g in groups] == [3, 2, 2]  # unequal groups: the mean must be weighted by task count
        result = aggregate(pool.map("compute", groups, 5, pool.put(coord.published())))
    finally:
        pool.shutdown()
    worker = MetaWorker(spec)
    batch = worker.source("train").batch(5, range(7)).to("cpu", torch.float64)
    reference = meta_gradient(worker.alg, coord.params, batch)
    assert result.tasks == 7 and result.grads.keys() == reference.grads.keys()
    for k, g in reference.grads.items():
        assert torch.allclose(result.grads[k], g / 7, rtol=0, atol=1e-10), k


def test_job_runs_end_to_end_and_logs_to_wandb_offline(local_ray, tmp_path):
    spec = job(tmp_path, logging__wandb={"mode": "offline", "dir": str(tmp_path / "wb")},
               outer__schedule={"warmup_steps": 2, "decay": "cosine"})
    out = train(spec)
    assert out["status"] == "finished" and out["step"] == 6
    assert 0.0 <= out["final/accuracy"] <= 1.0 and out["final/episodes"] == 12
    assert checkpoint.list_steps(spec.path(spec.checkpoint.dir)) == [2, 4, 6]
    [run_file] = run_files(tmp_path / "wb")
    rows = settled_history(run_file, "final/accuracy_ci95")
    logged = {k for row in rows for k in row}
    for key in ("train/loss", "train/accuracy", "episodes_per_s", "straggler_spread_s", "data_wait_fraction",
                "worker/0/compute_s", "worker/1/compute_s", "eval/accuracy", "final/accuracy_ci95"):
        assert key in logged, key
    lrs = [row["train/lr"] for row in rows if "train/lr" in row]
    assert lrs == pytest.approx([lr_at(spec.outer, step) for step in range(6)])  # warm-up, then cosine decay
    assert run_id(run_file) == out["wandb_run_id"]


def test_a_second_run_refuses_to_overwrite_checkpoints_without_resume(local_ray, tmp_path):
    spec = job(tmp_path, outer__steps=2)
    train(spec)
    with pytest.raises(CheckpointError, match="--resume"):
        train(spec)


def _kill_a_worker_mid_run(name_prefix: str, after_s: float, killed: list):
    def kill():
        deadline = time.time() + 60
        while time.time() < deadline and not killed:
            names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                     if a["name"].startswith(name_prefix) and a["name"].endswith("worker-1")]
            if names:
                time.sleep(after_s)
                ray.kill(ray.get_actor(names[0]), no_restart=False)
                killed.append(names[0])
                return
            time.sleep(0.05)

    t = threading.Thread(target=kill, daemon=True)
    t.start()
    return t


def test_killed_worker_mid_run_ends_with_identical_parameters(local_ray, tmp_path):
    clean = job(tmp_path / "clean", outer__steps=8, eval__every=0)
    reference = final_params(clean) if train(clean) else None
    faulty = job(tmp_path / "faulty", outer__steps=8, eval__every=0)
    killed: list = []
    thread = _kill_a_worker_mid_run("metascale-t-", 1.5, killed)
    out = train(faulty)
    thread.join()
    assert killed, "the fault was never injected"
    assert out["status"] == "finished"
    got = final_params(faulty)
    for k in reference:
        assert torch.equal(reference[k], got[k]), k


def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path, caplog):
    d = str(tmp_path / "ck")
    checkpoint.save(d, 1, {"step": 1, "x": torch.ones(3)}, keep=3)
    path = checkpoint.save(d, 2, {"step": 2, "x": torch.full((3,), 2.0)}, keep=3)
    blob = bytearray(open(path, "rb").read())
    blob[-5] ^= 0xFF
    open(path, "wb").write(bytes(blob))
    step, state = checkpoint.load_latest(d)
    assert step == 1 and torch.equal(state["x"], torch.ones(3))
    assert "checksum mismatch" in caplog.text
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        checkpoint.read(path)
    with open(path, "wb") as f:  # a torn write: only part of the payload made it
        f.write(bytes(blob[:120]))
    assert checkpoint.load_latest(d)[0] == 1
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        checkpoint.read(path)
    with open(path, "wb") as f:  # torn inside the header
        f.write(bytes(blob[:30]))
    with pytest.raises(CheckpointError, match="truncated"):
        checkpoint.read(path)


def test_checkpoints_keep_only_the_newest(tmp_path):
    d = str(tmp_path / "ck")
    for s in range(1, 6):
        checkpoint.save(d, s, {"step": s}, keep=2)
    assert checkpoint.list_steps(d) == [4, 5]
    assert not [p for p in (tmp_path / "ck").iterdir() if p.name.startswith(".tmp")]
