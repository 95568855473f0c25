"""`metascale run`: job spec -> coordinator -> workers -> meta-gradient -> update, step after step.

Every job runs this one loop, whatever its workers are (replicas, or DeepSpeed rank groups for large backbones:
the pool hides which). Each meta-step publishes the meta-parameters once (one object-store put), sends the
workers one WorkItem per slot group, aggregates their summed meta-gradients in slot order and steps the
meta-optimiser, which lives here, on the coordinator, for every job. Checkpoints are written every
`checkpoint.every` steps, at the end, and after SIGTERM or Ctrl-C; `--resume` continues from the newest good one
(`--auto-resume`: if there is one, else it starts fresh: what a retried cluster job runs).
The run holds its checkpoint directory's lease (cluster/lease.py) from before anything starts until it ends.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

from metascale.cluster import checkpoint
from metascale.cluster.coordinator import Coordinator, NonFiniteError, StepResult, check_compatible
from metascale.cluster.estimators import pick as pick_estimator
from metascale.cluster.lease import HEARTBEAT_S, TTL_S, Lease
from metascale.cluster.optim import lr_at
from metascale.cluster.pool import build_pool
from metascale.cluster.preemption import StopRequest
from metascale.config import JobSpec, dump_spec
from metascale.data import check_episodes
from metascale.errors import CheckpointError, CheckpointWriteError, MetascaleError
from metascale.evaluate import evaluate
from metascale.monitor import Monitor

log = logging.getLogger(__name__)
SAVE_ATTEMPTS = 3  # a checkpoint write is tried this often (1 s, then 2 s apart) before the run stops


def train(spec: JobSpec, resume: bool | str = False) -> dict[str, Any]:
    """`resume`: False, a new run (refused if the checkpoint directory already holds checkpoints); True, continue
    from the newest good checkpoint (refused if there is none); "auto", continue if the directory holds a checkpoint,
    else start a new run (what a retried cluster job needs)."""
    if resume not in (False, True, "auto"):
        raise ValueError(f"resume={resume!r}: expected False, True or 'auto'")
    ckpt_dir = spec.path(spec.checkpoint.dir)
    # Resuming right after a crash elsewhere: wait (bounded) for the dead run's lease to go stale.
    with Lease.acquire(ckpt_dir, wait_s=TTL_S + HEARTBEAT_S if resume else 0.0) as lease:
        check_episodes(spec)  # a split that cannot make the job's episodes fails now, not after the training
        coord = Coordinator(spec)
        run_id = _restore(coord, ckpt_dir, resume)
        pool = build_pool(spec)
        try:
            return _loop(spec, coord, pool, Monitor(spec, run_id, coord.step), lease, ckpt_dir)
        finally:
            pool.shutdown()


def _loop(
    spec: JobSpec, coord: Coordinator, pool: Any, monitor: Monitor, lease: Lease, ckpt_dir: str
) -> dict[str, Any]:
    estimate = pick_estimator(spec, coord)
    stop = StopRequest()
    saved: list[int] = checkpoint.list_steps(ckpt_dir)[-1:]

    def save() -> None:
        lease.check(reread=True)  # a run that lost its directory to another must not write (save also prunes)
        state = {**coord.state_dict(), "spec": dump_spec(spec), "wandb_run_id": monitor.run_id}
        for attempt in range(1, SAVE_ATTEMPTS + 1):
            try:
                path = checkpoint.save(ckpt_dir, coord.step, state, spec.checkpoint.keep)
                break
            except Exception as e:  # noqa: BLE001 - disk full, read-only, a store that failed: the same to the user
                if attempt == SAVE_ATTEMPTS:
                    last = f"step {saved[-1]}" if saved else "none"
                    raise CheckpointWriteError(
                        f"could not write the checkpoint of step {coord.step} to {ckpt_dir} after {attempt} tries "
                        f"({type(e).__name__}: {str(e)[:200]}); the last saved checkpoint is {last}: fix the "
                        "storage, then --resume"
                    ) from None
                log.warning("checkpoint of step %d: write failed (%s); trying again", coord.step, e)
                time.sleep(attempt)
        saved.append(coord.step)
        monitor.artifact(path, coord.step)

    skipped_in_a_row = 0
    try:
        while coord.step < spec.outer.steps and not stop.requested:
            lease.check()
            t0 = time.perf_counter()
            params = pool.put(coord.published())
            result = estimate(pool, coord.step, params)
            applied = coord.apply(result)
            skipped_in_a_row = 0 if applied else skipped_in_a_row + 1
            elapsed = time.perf_counter() - t0
            metrics = {f"train/{k}": v for k, v in result.metrics.items()}
            metrics["train/lr"] = lr_at(spec.outer, coord.step - 1)
            metrics.update(_timing(result, elapsed, pool.failures))
            if spec.eval.every and coord.step % spec.eval.every == 0 and coord.step < spec.outer.steps:
                metrics.update(evaluate(pool, pool.put(coord.published()), spec, spec.eval.episodes, "eval"))
            monitor.step(coord.step, metrics)
            if skipped_in_a_row >= spec.executor.max_skipped_steps:
                save()
                raise NonFiniteError(
                    f"the last {skipped_in_a_row} meta-steps (to step {coord.step}) were all skipped: the "
                    f"meta-gradient was not finite (executor.nonfinite={spec.executor.nonfinite}); the run has "
                    "diverged: lower outer.lr or algorithm.inner.lr, or set outer.grad_clip, then --resume"
                )
            if spec.checkpoint.every and coord.step % spec.checkpoint.every == 0:
                save()
        if not saved or saved[-1] != coord.step:
            save()  # the last step's, unless the schedule has just written it
        if stop.requested:
            monitor.summary({"stopped_at_step": coord.step, "checkpoint": ckpt_dir})
            return {
                "status": "stopped",
                "signal": stop.requested,
                "step": coord.step,
                "checkpoint_dir": ckpt_dir,
                "worker_failures": pool.failures,
            }
        final = evaluate(pool, pool.put(coord.published()), spec, spec.eval.final_episodes, "final")
        monitor.summary(final)
        return {
            "status": "finished",
            "step": coord.step,
            "skipped_steps": coord.skipped_steps,
            "worker_failures": pool.failures,
            "checkpoint_dir": ckpt_dir,
            "wandb_run_id": monitor.run_id,
            **final,
        }
    except MetascaleError:
        # Between steps the coordinator's state is whole (a failed step never reaches apply, and apply refuses
        # before it changes anything): keep what the run has done before the error is reported.
        if not saved or saved[-1] != coord.step:
            with contextlib.suppress(MetascaleError):
                save()
        raise
    finally:
        stop.restore()
        monitor.close()


def _restore(coord: Coordinator, ckpt_dir: str, resume: bool | str) -> str | None:
    """Loads the newest good checkpoint on --resume; refuses to overwrite an earlier run's checkpoints without it.
    --auto-resume resumes when the directory holds a checkpoint, even one that turns out unreadable (an error then,
    never a fresh start over a run's history), and starts fresh when it holds none: from `model.init_from` if set."""
    if resume == "auto":
        resume = bool(checkpoint.list_steps(ckpt_dir))
        log.info(
            "--auto-resume: %s",
            f"continuing from {ckpt_dir}" if resume else f"no checkpoint in {ckpt_dir}, starting a new run",
        )
    if not resume:
        if checkpoint.list_steps(ckpt_dir):
            raise CheckpointError(
                f"{ckpt_dir} already holds checkpoints of a run: pass --resume to continue it, "
                "or set checkpoint.dir (or the job name) for a new run"
            )
        if coord.spec.model.init_from is not None:
            loaded = coord.init_from_file()
            log.info("model.init_from %s: %d parameter tensors loaded", coord.spec.model.init_from, loaded)
        return None
    found = checkpoint.load_latest(ckpt_dir)
    if found is None:
        raise CheckpointError(f"--resume: no readable checkpoint in {ckpt_dir}")
    check_compatible(coord, found[1], f"--resume from {ckpt_dir}")
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
