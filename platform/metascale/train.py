"""`metascale run`: job spec -> coordinator -> workers -> meta-gradient -> update, step after step.

Every job runs this one loop, whatever its workers are (replicas, or DeepSpeed rank groups for large backbones:
the pool hides which). Each meta-step publishes the meta-parameters once (one object-store put), sends the
workers one WorkItem per slot group, aggregates their summed meta-gradients in slot order and steps the
meta-optimiser, which lives here, on the coordinator, for every job. Checkpoints are written every
`checkpoint.every` steps, at the end, and on SIGTERM; `--resume` continues from the newest good one.
"""

from __future__ import annotations

import time
from typing import Any

from metascale.cluster import checkpoint
from metascale.cluster.coordinator import Coordinator, StepResult
from metascale.cluster.estimators import pick as pick_estimator
from metascale.cluster.optim import lr_at
from metascale.cluster.pool import build_pool
from metascale.cluster.preemption import StopRequest
from metascale.config import JobSpec, dump_spec
from metascale.errors import CheckpointError
from metascale.evaluate import evaluate
from metascale.monitor import Monitor


def train(spec: JobSpec, resume: bool = False) -> dict[str, Any]:
    coord = Coordinator(spec)
    ckpt_dir = spec.path(spec.checkpoint.dir)
    run_id = _restore(coord, ckpt_dir, resume)

    pool = build_pool(spec)
    monitor = Monitor(spec, run_id, coord.step)
    estimate = pick_estimator(spec)
    stop = StopRequest()
    evals: dict[str, float] = {}

    def save() -> None:
        state = {**coord.state_dict(), "spec": dump_spec(spec), "wandb_run_id": monitor.run_id}
        path = checkpoint.save(ckpt_dir, coord.step, state, spec.checkpoint.keep)
        monitor.artifact(path, coord.step)

    try:
        while coord.step < spec.outer.steps and not stop.requested:
            t0 = time.perf_counter()
            params = pool.put(coord.published())
            result = estimate(pool, coord.step, params)
            coord.apply(result)
            elapsed = time.perf_counter() - t0
            metrics = {f"train/{k}": v for k, v in result.metrics.items()}
            metrics["train/lr"] = lr_at(spec.outer, coord.step - 1)
            metrics.update(_timing(result, elapsed, pool.failures))
            if spec.eval.every and coord.step % spec.eval.every == 0 and coord.step < spec.outer.steps:
                evals = evaluate(pool, pool.put(coord.published()), spec, spec.eval.episodes, "eval")
                metrics.update(evals)
            monitor.step(coord.step, metrics)
            if spec.checkpoint.every and coord.step % spec.checkpoint.every == 0:
                save()
        if spec.checkpoint.every == 0 or coord.step % spec.checkpoint.every:
            save()  # the last step's, unless the schedule has just written it
        if stop.requested:
            monitor.summary({"stopped_at_step": coord.step, "checkpoint": ckpt_dir})
            return {"status": "stopped", "step": coord.step, "checkpoint_dir": ckpt_dir,
                    "worker_failures": pool.failures}
        final = evaluate(pool, pool.put(coord.published()), spec, spec.eval.final_episodes, "final")
        monitor.summary(final)
        return {"status": "finished", "step": coord.step, "skipped_steps": coord.skipped_steps,
                "worker_failures": pool.failures, "checkpoint_dir": ckpt_dir, "wandb_run_id": monitor.run_id, **final}
    finally:
        stop.restore()
        monitor.close()
        pool.shutdown()


def _restore(coord: Coordinator, ckpt_dir: str, resume: bool) -> str | None:
    """Loads the newest good checkpoint on --resume; refuses to overwrite an earlier run's checkpoints without it."""
    found = checkpoint.load_latest(ckpt_dir)
    if not resume:
        if checkpoint.list_steps(ckpt_dir):
            raise CheckpointError(
                f"{ckpt_dir} already holds checkpoints of a run: pass --resume to continue it, "
                "or set checkpoint.dir (or the job name) for a new run"
            )
        return None
    if found is None:
        raise CheckpointError(f"--resume: no readable checkpoint in {ckpt_dir}")
    coord.load_state_dict(found[1])
    return found[1].get("wandb_run_id")


def _timing(result: StepResult, elapsed: float, failures: int) -> dict[str, float]:
    times = list(result.worker_s.values())
    return {
        "episodes_per_s": result.tasks / elapsed,
        "step_s": elapsed,
        "straggler_spread_s": max(times) - min(times),
        "data_wait_fraction": result.data_s / max(sum(times) + result.data_s, 1e-9),
        "worker_failures": float(failures),
        **{f"worker/{w}/compute_s": t for w, t in result.worker_s.items()},
        **{f"worker/{w}/peak_mib": b / 2**20 for w, b in result.peak_bytes.items()},
    }
