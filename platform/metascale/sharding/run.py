"""`metascale run` with `sharding.engine: deepspeed`: the driver starts one rank group and orchestrates it.

The meta-parameters and the meta-optimiser live in the ranks (partitioned under ZeRO-3, or in the engine's ZeRO
optimiser for second order), never in the driver: the driver sends "do meta-step s", records the metrics the ranks
reduced among themselves, asks for evaluation and checkpoints (each rank writes its own shard), exactly on the
schedule `train.py` keeps for un-sharded runs. SIGTERM checkpoints after the current step and exits cleanly, and
the W&B run id travels in the shards so that `--resume` continues the same run. `metascale eval` of a sharded job
loads the shards into a rank group the same way (`evaluate_sharded`).
"""

from __future__ import annotations

import time
from typing import Any

from metascale.cluster import checkpoint
from metascale.cluster.preemption import StopRequest
from metascale.cluster.worker import ALLOCATOR_ENV
from metascale.config import SECOND_ORDER, JobSpec
from metascale.errors import CheckpointError
from metascale.evaluate import summarise
from metascale.monitor import Monitor
from metascale.sharding import worker
from metascale.sharding.launch import RankGroup


def train_sharded(spec: JobSpec, resume: bool = False) -> dict[str, Any]:
    ckpt_dir = spec.path(spec.checkpoint.dir)
    rank0 = f"{ckpt_dir.rstrip('/')}/rank-0-of-{spec.sharding.ranks}"
    if not resume and checkpoint.list_steps(rank0):
        raise CheckpointError(f"{ckpt_dir} already holds checkpoints of a run: pass --resume to continue it, "
                              "or set checkpoint.dir (or the job name) for a new run")
    if resume and spec.sharding.precision != "fp32" and spec.algorithm.name in SECOND_ORDER \
            and not spec.algorithm.inner.first_order:
        raise CheckpointError("--resume: second-order sharded runs checkpoint the meta-optimiser state in fp32 only "
                              "(DeepSpeed's bf16 optimiser keeps it differently); start a new run")
    stop = StopRequest()
    try:
        with RankGroup(spec.sharding.ranks, spec.executor.threads, env=ALLOCATOR_ENV) as group:
            group.call(worker.setup, spec.model_dump(mode="json"))
            start, run_id = _load(group, ckpt_dir, "--resume") if resume else (0, None)
            monitor = Monitor(spec, run_id, start)
            try:
                return _loop(spec, group, monitor, ckpt_dir, start, stop)
            finally:
                monitor.close()
    finally:
        stop.restore()


def _load(group: RankGroup, ckpt_dir: str, what: str) -> tuple[int, str | None]:
    """Every rank loads its newest good shard; they must agree on the step."""
    found = group.call(worker.load, ckpt_dir)
    if None in found:
        raise CheckpointError(f"{what}: no complete checkpoint in {ckpt_dir} (rank {found.index(None)} has no good "
                              "shard): train first with metascale run")
    if len({step for step, _ in found}) != 1:
        raise CheckpointError(f"{what}: the ranks' newest good shards in {ckpt_dir} disagree "
                              f"(steps {[step for step, _ in found]})")
    return found[0]


def evaluate_sharded(spec: JobSpec, episodes: int) -> dict[str, Any]:
    """`metascale eval` of a sharded job: the job's newest checkpoint shards, evaluated in a rank group."""
    ckpt_dir = spec.path(spec.checkpoint.dir)
    with RankGroup(spec.sharding.ranks, spec.executor.threads, env=ALLOCATOR_ENV) as group:
        group.call(worker.setup, spec.model_dump(mode="json"))
        step, _ = _load(group, ckpt_dir, "eval")
        return {"checkpoint_step": step, **_evaluate(spec, group, episodes, spec.eval.split)}


def _evaluate(spec: JobSpec, group: RankGroup, episodes: int, prefix: str) -> dict[str, float]:
    per_episode = group.call(worker.evaluate, spec.eval.split, list(range(episodes)), spec.eval.inner_steps)[0]
    return summarise(per_episode, prefix)


def _loop(spec: JobSpec, group: RankGroup, monitor: Monitor, ckpt_dir: str, step: int,
          stop: StopRequest) -> dict[str, Any]:
    slots = list(range(spec.outer.meta_batch))

    def save(at: int) -> None:
        group.call(worker.save, ckpt_dir, at, spec.checkpoint.keep, {"wandb_run_id": monitor.run_id})

    skipped = 0
    while step < spec.outer.steps and not stop.requested:
        t0 = time.perf_counter()
        result = group.call(worker.step, step, slots)[0]  # every rank returns the same reduced metrics
        step += 1
        skipped += result["tasks"] == 0
        elapsed = time.perf_counter() - t0
        metrics = {f"train/{k}": v for k, v in result.items() if k not in ("tasks", "nonfinite")}
        metrics.update({"episodes_per_s": result["tasks"] / elapsed, "step_s": elapsed,
                        "nonfinite_tasks": float(len(result["nonfinite"]))})
        if spec.eval.every and step % spec.eval.every == 0 and step < spec.outer.steps:
            metrics.update(_evaluate(spec, group, spec.eval.episodes, "eval"))
        monitor.step(step, metrics)
        if spec.checkpoint.every and step % spec.checkpoint.every == 0:
            save(step)
    if spec.checkpoint.every == 0 or step % spec.checkpoint.every:
        save(step)  # the last step's, unless the schedule has just written it
    if stop.requested:
        monitor.summary({"stopped_at_step": step, "checkpoint": ckpt_dir})
        return {"status": "stopped", "step": step, "checkpoint_dir": ckpt_dir}
    final = _evaluate(spec, group, spec.eval.final_episodes, "final")
    monitor.summary(final)
    return {"status": "finished", "step": step, "skipped_steps": skipped, "checkpoint_dir": ckpt_dir,
            "wandb_run_id": monitor.run_id, "ranks": spec.sharding.ranks, **final}
