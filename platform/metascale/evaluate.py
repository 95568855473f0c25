"""Evaluation as the field reports it: mean post-adaptation accuracy (or MSE) over held-out tasks with a 95%
confidence interval (1.96 standard errors). The held-out episodes are the same at every evaluation (step 0 of the
split's stream), so curves compare like with like."""

from __future__ import annotations

import math
from typing import Any

from metascale.config import JobSpec


def summarise(per_episode: list[dict[str, float]], prefix: str) -> dict[str, float]:
    out: dict[str, float] = {f"{prefix}/episodes": float(len(per_episode))}
    for key in per_episode[0]:
        values = [e[key] for e in per_episode]
        mean = sum(values) / len(values)
        var = sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1)
        out[f"{prefix}/{key}"] = mean
        out[f"{prefix}/{key}_ci95"] = 1.96 * math.sqrt(var / len(values))
    return out


def evaluate(pool: Any, params: Any, spec: JobSpec, episodes: int, prefix: str) -> dict[str, float]:
    from metascale.cluster.estimators import items

    todo = items("evaluate", None, episodes, pool.size, split=spec.eval.split, inner_steps=spec.eval.inner_steps)
    return summarise([e for result in pool.run(todo, params) for e in result.episodes], prefix)


def evaluate_checkpoint(spec: JobSpec, checkpoint: str | None, episodes: int | None) -> dict[str, Any]:
    """`metascale eval`: loads a checkpoint (default: the job's latest good one) and evaluates it."""
    from metascale.cluster import checkpoint as ckpt
    from metascale.cluster.coordinator import Coordinator, check_compatible
    from metascale.cluster.pool import build_pool
    from metascale.cluster.replica import to_numpy
    from metascale.errors import CheckpointError

    directory = spec.path(spec.checkpoint.dir)
    if checkpoint:  # a step folder, its manifest, a format-1 file, or a checkpoint directory (its newest good one)
        step, state = ckpt.resolve(checkpoint)
    else:
        found = ckpt.load_latest(directory)
        if found is None:
            raise CheckpointError(f"no checkpoint in {directory}: train first (metascale run) or pass --checkpoint")
        step, state = found
    check_compatible(Coordinator(spec), state, f"eval of {checkpoint or directory}")
    pool = build_pool(spec)
    try:
        n = episodes or spec.eval.final_episodes
        result = evaluate(pool, pool.put(to_numpy(state["params"])), spec, n, spec.eval.split)
    finally:
        pool.shutdown()
    return {"checkpoint_step": state.get("step") if step is None else step, **result}
