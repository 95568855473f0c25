"""The training loop on real Ray: aggregation equals the single-process meta-gradient, faults injected at a known
step (a worker that dies, one that hangs) cost time and not results, checkpoints resume exactly, and the W&B
offline run holds what was logged."""

from __future__ import annotations

import pytest
import torch

from metascale.algorithms.executor import meta_gradient
from metascale.cluster import checkpoint
from metascale.cluster.coordinator import Coordinator, aggregate
from metascale.cluster.estimators import items
from metascale.cluster.optim import lr_at
from metascale.cluster.pool import RayPool
from metascale.cluster.replica import Replica
from metascale.errors import CheckpointError
from metascale.train import train
from wandb_records import artifacts, run_files, run_id, run_info, settled, settled_history


@pytest.mark.parametrize("algorithm", ["maml", "learned_hparams"])  # learned_hparams: 0-d meta-parameters
def test_aggregated_meta_gradient_equals_single_process(local_ray, tmp_path, make_job, algorithm):
    spec = make_job(tmp_path, outer__meta_batch=7, cluster__workers=3, algorithm__name=algorithm)
    coord = Coordinator(spec)
    pool = RayPool(spec)
    try:
        work = items("meta_gradient", 5, 7, 3)
        assert [len(i.slots) for i in work] == [3, 2, 2]  # unequal groups: the mean must be weighted by task count
        result = aggregate(pool.run(work, pool.put(coord.published())))
    finally:
        pool.shutdown()
    worker = Replica(spec)
    batch = worker.source("train").batch(5, range(7)).to("cpu", torch.float64)
    reference = meta_gradient(worker.alg, coord.params, batch)
    assert result.tasks == 7 and result.grads.keys() == reference.grads.keys()
    for k, g in reference.grads.items():
        assert torch.allclose(result.grads[k], g / 7, rtol=0, atol=1e-10), k


def test_job_runs_end_to_end_and_logs_to_wandb_offline(local_ray, tmp_path, make_job, monkeypatch):
    monkeypatch.setenv("METASCALE_JOB_ID", "t-abc123")  # what a submitted job's environment holds
    wandb = {"mode": "offline", "dir": str(tmp_path / "wb"), "group": "ablation", "tags": ["maml", "ci"]}
    spec = make_job(tmp_path, logging__wandb=wandb, outer__schedule={"warmup_steps": 2, "decay": "cosine"})
    out = train(spec)
    assert out["status"] == "finished" and out["step"] == 6 and out["worker_failures"] == 0
    assert 0.0 <= out["final/accuracy"] <= 1.0 and out["final/episodes"] == 12
    assert checkpoint.list_steps(spec.path(spec.checkpoint.dir)) == [2, 4, 6]
    [run_file] = run_files(tmp_path / "wb")
    rows = settled_history(run_file, "final/accuracy_ci95")
    logged = {k for row in rows for k in row}
    for key in (
        "train/loss",
        "train/accuracy",
        "episodes_per_s",
        "straggler_spread_s",
        "data_wait_fraction",
        "worker/0/compute_s",
        "worker/1/compute_s",
        "worker/0/peak_mib",
        "eval/accuracy",
        "final/accuracy_ci95",
    ):
        assert key in logged, key
    lrs = [row["train/lr"] for row in rows if "train/lr" in row]
    assert lrs == pytest.approx([lr_at(spec.outer, step) for step in range(6)])  # warm-up, then cosine decay
    assert run_id(run_file) == out["wandb_run_id"]
    info = run_info(settled(run_file))
    assert (info["group"], info["tags"], info["job_type"]) == ("ablation", ["maml", "ci"], "train")
    assert info["config"]["metascale"]["job_id"] == "t-abc123" and info["config"]["metascale"]["cluster_address"]
    # log_checkpoints: final (the default): of the checkpoints at 2, 4 and 6, the last one, scored by the final
    # evaluation, with both aliases
    [model] = [a for a in artifacts(run_file) if a["type"] == "model"]
    assert sorted(model["aliases"]) == ["best", "latest"] and model["name"] == f"model-{out['wandb_run_id']}"
    assert model["metadata"]["step"] == 6 and model["metadata"]["score"] == out["final/accuracy"]
    assert artifacts(run_file) == [model]  # nothing else: the periodic checkpoints are not uploaded


def test_a_second_run_refuses_to_overwrite_checkpoints_without_resume(local_ray, tmp_path, make_job):
    spec = make_job(tmp_path, outer__steps=2)
    train(spec)
    with pytest.raises(CheckpointError, match="--resume"):
        train(spec)


@pytest.mark.parametrize("fault", ["exit", "hang"])
def test_a_worker_lost_at_step_3_is_recomputed_and_the_run_ends_bit_identical(
    local_ray, tmp_path, make_job, drill, ends_fault_free, fault
):
    """Worker 1 exits (or stops: SIGSTOP, alive and silent) as it starts meta-step 3; its slots are recomputed on
    worker 0 within the step (the hang after `cluster.timeout`), and every later step runs as usual."""
    timeout = {"min_s": 2.0, "factor": 5.0}  # a hang is found in seconds, not minutes
    clean = make_job(tmp_path / "clean", outer__steps=6, eval__every=0, cluster__timeout=timeout)
    train(clean)
    fired = drill(f"{fault}:3:1")
    faulty = make_job(tmp_path / "faulty", outer__steps=6, eval__every=0, cluster__timeout=timeout)
    ends_fault_free(train(faulty), faulty, clean, fired)
