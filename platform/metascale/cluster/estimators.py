"""How a meta-step's update direction is computed across the workers (after learned_optimization's gradient
estimators): each estimator maps (pool, step, published params) to one aggregated `StepResult`, sending the workers
WorkItems (cluster/messages.py), one per slot group.

'backprop': every worker returns the summed meta-gradient of its slots, the coordinator sums them in slot order.
'es': the slots are antithetic pairs; every worker returns only (pair, F+, F-) scalars, the coordinator regenerates
      each pair's noise from its seed and builds the evolution-strategies estimate (algorithms/es.py).
'ftml': online meta-learning (Follow the Meta Leader, Finn et al. 2019): task t of the stream is episode (t, 0) of
      the train split (data.tasks.online_stream: shards in window order when streamed) and arrives at meta-step t;
      it is scored with the current meta-parameters before any update on it (the online metric), joins the buffer,
      and the step's meta-gradient is taken over it plus tasks drawn from the earlier buffer.
With `cluster.aggregation: allreduce`, 'backprop' runs as `allreduce`: the workers sum among themselves.
All are pure functions of (seed, step, slot), so an item lost with its worker is recomputed bit for bit.
"""

from __future__ import annotations

import math
import weakref
from functools import partial
from typing import Any, Callable

import numpy as np
import torch

from metascale.algorithms import es as es_math
from metascale.cluster.coordinator import StepResult, aggregate
from metascale.cluster.messages import WorkItem
from metascale.cluster.pool import split_slots
from metascale.config import JobSpec

Estimator = Callable[[Any, int, Any], StepResult]  # (pool, step, published params) -> StepResult


def items(kind: str, step: int, slots: int, workers: int, **extra: Any) -> list[WorkItem]:
    """One item per slot group: `slots` slots split into contiguous groups, one per worker."""
    return [WorkItem(kind, step, tuple(g), **extra) for g in split_slots(slots, workers)]  # type: ignore[arg-type]


def backprop(spec: JobSpec, pool: Any, step: int, params: Any, sampled_by: Any = None) -> StepResult:
    batch = items("meta_gradient", step, spec.outer.meta_batch, pool.size, sampled_by=sampled_by)
    return aggregate(pool.run(batch, params))


def allreduce(spec: JobSpec, pool: Any, step: int, params: Any, sampled_by: Any = None) -> StepResult:
    """'backprop' with `cluster.aggregation: allreduce`: the workers sum among themselves (cluster/allreduce.py) and
    the coordinator receives rank 0's reduced sum; one in-driver worker has nothing to reduce."""
    from metascale.cluster.allreduce import AllReduce

    if not hasattr(pool, "workers"):
        return backprop(spec, pool, step, params, sampled_by)
    if pool not in _GROUPS:
        _GROUPS[pool] = AllReduce()
    batch = items("meta_gradient", step, spec.outer.meta_batch, pool.size, sampled_by=sampled_by)
    return aggregate(_GROUPS[pool].step(pool, batch, params))


def epochs(spec: JobSpec, coord: Any, base: Estimator, pool: Any, step: int, params: Any) -> StepResult:
    """`algorithm.maml_rl.epochs` E: PPO's epochs on one batch of rollouts (MAML-PPO as in ProMP, Rothfuss et al.
    2019). Round 0 samples the step's rollouts with the published theta_old, as a one-epoch step does; the coordinator
    steps, and each later round sends the new meta-parameters with a reference to a copy of theta_old, from which the
    workers regenerate the same rollouts (task seeds) and re-adapt on them. The loop applies the last round's result
    (the step's E-th update). A step applies whole or not at all: a round that fails, or that the non-finite policy
    skips, restores theta_old and the optimiser state (a skipped round skips the step)."""
    result = base(pool, step, params)
    snap = coord.snapshot()
    old = pool.put(snap[0])
    worker_s, data_s = dict(result.worker_s), result.data_s
    try:
        for _ in range(1, spec.algorithm.maml_rl.epochs):
            if not coord.apply(result, advance=False):
                coord.restore(snap)
                return result
            result = base(pool, step, pool.put(coord.published()), sampled_by=old)
            for w, t in result.worker_s.items():
                worker_s[w] = worker_s.get(w, 0.0) + t
            data_s += result.data_s
    except BaseException:
        coord.restore(snap)
        raise
    result.worker_s, result.data_s = worker_s, data_s
    return result


def es(spec: JobSpec, pool: Any, step: int, params: Any) -> StepResult:
    cfg = spec.outer.es
    results = pool.run(items("fitness", step, spec.outer.meta_batch, pool.size), params)
    rows = [row for r in results for row in r.fitness]  # item order: independent of arrival order
    good = [row for row in rows if math.isfinite(row[1]) and math.isfinite(row[2])]
    theta = {k: torch.tensor(np.array(v)) for k, v in pool.get(params).items()}
    pairs, plus, minus = zip(*good) if good else ((), (), ())
    grads = es_math.estimate(theta, spec.seed, step, pairs, plus, minus, cfg.sigma, cfg.shaping) if good else {}
    fit = [f for _, a, b in good for f in (a, b)]
    metrics = {"es_fitness": sum(fit) / len(fit), "es_fitness_spread": max(fit) - min(fit)} if fit else {}
    return StepResult(
        grads=grads,
        tasks=sum(r.tasks for r in results) if good else 0,
        metrics=metrics,
        worker_s={r.worker: r.compute_s for r in results},
        data_s=sum(r.data_s for r in results),
        nonfinite=[(row[0], r.worker) for r in results for row in r.fitness if row not in good],
    )


def ftml(spec: JobSpec, pool: Any, step: int, params: Any) -> StepResult:
    arriving = step
    [scored] = pool.run([WorkItem("evaluate", arriving, (0,))], params)  # episode (t, 0): task t, before any update
    rng = np.random.default_rng(np.random.SeedSequence([step, 0xF7]))
    batch = spec.outer.meta_batch
    earlier = rng.choice(arriving, size=min(batch - 1, arriving), replace=False).tolist() if arriving else []
    chosen = sorted([arriving, *earlier])
    groups = [
        WorkItem("meta_gradient", arriving, tuple(chosen[i] for i in g), online=True)
        for g in split_slots(len(chosen), pool.size)
    ]
    result = aggregate(pool.run(groups, params))
    result.metrics.update({f"online_{k}": v for k, v in scored.episodes[0].items()})
    return result


ESTIMATORS: dict[str, Callable[..., StepResult]] = {"backprop": backprop, "es": es, "ftml": ftml}
UNROLLED = ("pes", "tbptt")  # cluster/unrolled.py: they read the coordinator's history of published parameters
_GROUPS: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()  # a pool's all-reduce group


def pick(spec: JobSpec, coord: Any = None) -> Estimator:
    """The job's estimator; 'backprop' aggregates by all-reduce when `cluster.aggregation` says so; the truncated
    unrolls' also get the coordinator (its history of published meta-parameters)."""
    if spec.outer.estimator in UNROLLED:
        from metascale.cluster import unrolled

        return partial(unrolled.ESTIMATORS[spec.outer.estimator], spec, coord)
    chosen = allreduce if spec.cluster.aggregation == "allreduce" else ESTIMATORS[spec.outer.estimator]
    if spec.algorithm.name == "maml_rl" and spec.algorithm.maml_rl.epochs > 1:  # backprop: the spec checks
        return partial(epochs, spec, coord, partial(chosen, spec))
    return partial(chosen, spec)
