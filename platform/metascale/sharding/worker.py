"""What a rank of a sharded worker does, as functions the driver sends with `RankGroup.call` (sharding/launch.py).

`setup` builds the learner (first order: sharding/inner.py, second order: sharding/outer.py) and keeps it in the
rank's RANK_STATE; `step`, `evaluate`, `save` and `load` use it. Every rank materialises the same tasks (they are
pure functions of seed, step and slot) and takes its share; LITE's subsets come from a generator seeded the same way,
so every rank draws the same subset.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from metascale.config import SECOND_ORDER, JobSpec
from metascale.data import build_task_source, output_dim
from metascale.data.tasks import Split, TaskSource, held_out
from metascale.models import build_model
from metascale.sharding.launch import RANK_STATE


def build_learner(spec: JobSpec, rank: int, world: int) -> Any:
    from metascale.sharding.inner import ShardedFirstOrder
    from metascale.sharding.outer import ShardedSecondOrder

    def make_model() -> torch.nn.Module:
        torch.manual_seed(spec.seed)  # the coordinator's initialisation, identical on every rank
        return build_model(spec.model, output_dim(spec.data))

    second = spec.algorithm.name in SECOND_ORDER and not spec.algorithm.inner.first_order
    return (ShardedSecondOrder if second else ShardedFirstOrder)(spec, make_model, rank, world)


def setup(spec_json: dict[str, Any]) -> int:
    spec = JobSpec.model_validate(spec_json)
    learner = build_learner(spec, RANK_STATE["rank"], RANK_STATE["world"])
    RANK_STATE.update(spec=spec, learner=learner, sources={})
    return sum(t.numel() for t in _local_tensors(learner))


def _local_tensors(learner: Any) -> list[torch.Tensor]:
    from metascale.sharding.engine import is_partitioned

    return [p.ds_tensor if is_partitioned(p) else p for p in learner.engine.module.parameters()]


def _source(split: Split) -> TaskSource:
    spec: JobSpec = RANK_STATE["spec"]
    if split not in RANK_STATE["sources"]:
        RANK_STATE["sources"][split] = build_task_source(spec.data, split, spec.seed)
    return RANK_STATE["sources"][split]


def lite_generator(seed: int, step: int, slot: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, step, slot]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


def step(step: int, slots: Sequence[int]) -> dict[str, Any]:
    spec: JobSpec = RANK_STATE["spec"]
    gens = [lite_generator(spec.seed, step, s) if spec.sharding.support_backprop_subset else None for s in slots]
    return RANK_STATE["learner"].meta_step(step, _source("train").batch(step, slots).tasks(), gens)


def evaluate(split: Split, slots: Sequence[int], steps: int | None) -> list[dict[str, float]]:
    return RANK_STATE["learner"].evaluate(held_out(_source(split), slots).tasks(), steps)


def _rank_dir(directory: str) -> str:
    return f"{directory.rstrip('/')}/rank-{RANK_STATE['rank']}-of-{RANK_STATE['world']}"


def save(directory: str, step: int, keep: int, extra: dict[str, Any]) -> str:
    """Each rank writes its own shard (atomic, checksummed: cluster/checkpoint.py); nothing is gathered. `extra`
    (the driver's records, e.g. the W&B run id) goes into every shard."""
    from metascale.cluster import checkpoint

    state = {"step": step, **extra, **RANK_STATE["learner"].state_dict()}
    return checkpoint.save(_rank_dir(directory), step, state, keep)


def load(directory: str) -> tuple[int, str | None] | None:
    """Loads this rank's newest good shard: (its step, the W&B run id it recorded). The driver checks that every
    rank found the same step."""
    from metascale.cluster import checkpoint

    found = checkpoint.load_latest(_rank_dir(directory))
    if found is None:
        return None
    RANK_STATE["learner"].load_state_dict(found[1])
    return found[0], found[1].get("wandb_run_id")
