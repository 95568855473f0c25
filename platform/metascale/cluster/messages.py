"""The one contract between the coordinator and its workers: a `WorkItem` goes out, a `WorkResult` comes back.

Every kind of worker (a replica: one process, cluster/replica.py; a rank group: `sharding.ranks` processes running
one DeepSpeed engine, sharding/group.py) takes the same items and returns the same results, so the training loop,
the estimators and the fault handling never ask which kind they drive. Items are pure descriptions: the tasks are
functions of (seed, split, step, slot), so any worker, or a rebuilt one, recomputes an item bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from metascale.cluster import faults
from metascale.data.tasks import Split, TaskBatch, TaskSource, held_out, online_stream

Kind = Literal["meta_gradient", "fitness", "evaluate", "unroll"]
NumpyParams = dict[str, np.ndarray]


class WorkerBroken(RuntimeError):
    """Raised by a worker process that cannot serve (a rank whose group never formed, or lost a peer): the pool
    treats its worker as lost, ends it and starts it again."""


@dataclass(frozen=True)
class WorkItem:
    """One call to a worker.

    meta_gradient: the summed meta-gradient (or update direction) of episodes (step, slot) for `slots`;
    fitness:       evolution strategies: (pair, F+, F-) for the antithetic pairs `slots` of `step`;
    evaluate:      per-episode metrics after adaptation: episodes (step, slot), or with `step` None the split's
                   held-out episodes `slots`;
    unroll:        truncated unrolls (outer.estimator pes/tbptt, cluster/unrolled.py): one truncation of each particle
                   in `slots` at `step`; pes returns (pair, L+, L-) in `fitness`, tbptt the summed gradient.
    `online` (FTML): `slots` are tasks of the online stream, all arrived by meta-step `step`.
    `sampled_by`: recomputing an epoch's item regenerates the rollouts from the task seeds and theta_old, bit for bit."""

    kind: Kind
    step: int | None
    slots: tuple[int, ...]
    split: Split = "train"
    inner_steps: int | None = None  # evaluate: test-time adaptation steps (None: algorithm.inner.steps)
    online: bool = False
    # meta_gradient, PPO epochs after a step's first (algorithm.maml_rl.epochs): the meta-parameters that sampled the
    # step's rollouts (theta_old), by object-store reference (inline: the arrays); the call's params are the current
    # ones. None: the call's params sampled them.
    sampled_by: Any = field(default=None, compare=False)


@dataclass
class WorkResult:
    """What a worker sends back. Sums, not means, so that slot groups of different sizes weigh right."""

    worker: int
    tasks: int = 0  # tasks that counted (finite ones)
    grads: NumpyParams = field(default_factory=dict)  # meta_gradient: summed over the counted tasks
    metrics: dict[str, float] = field(default_factory=dict)  # summed over the counted tasks
    nonfinite_slots: list[int] = field(default_factory=list)  # left out, named for the non-finite policy
    fitness: list[tuple[int, float, float]] = field(default_factory=list)  # fitness: (pair, F+, F-)
    episodes: list[dict[str, float]] = field(default_factory=list)  # evaluate: one dict per slot, in slot order
    data_s: float = 0.0  # waiting for task data
    compute_s: float = 0.0
    peak_bytes: int | None = None  # the call's rise of the process's peak resident memory (Linux), largest rank
    reduce_s: float | None = None  # cluster.aggregation allreduce: the collective's seconds (None: none ran)
    host: str = ""


def item_tasks(item: WorkItem, source: TaskSource) -> TaskBatch:
    """The episodes `item` names (meta_gradient and evaluate items), the same on every worker and every rank."""
    if item.online:
        if item.step is None or max(item.slots) > item.step:
            raise ValueError(f"online tasks {item.slots} have not all arrived by meta-step {item.step}")
        return online_stream(source, item.slots)
    if item.step is None:
        return held_out(source, item.slots)
    batch = source.batch(item.step, item.slots)
    return faults.poison(batch, item.step, item.slots) if item.kind == "meta_gradient" else batch
