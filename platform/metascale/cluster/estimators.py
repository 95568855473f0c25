"""How a meta-step's update direction is computed across the workers (after learned_optimization's gradient
estimators): each estimator maps (pool, slot groups, step, published params) to one aggregated `StepResult`.

'backprop': every worker returns the summed meta-gradient of its slots, the coordinator sums them in slot order.
'es': the slots are antithetic pairs; every worker returns only (pair, F+, F-) scalars, the coordinator regenerates
      each pair's noise from its seed and builds the evolution-strategies estimate (algorithms/es.py).
'ftml': online meta-learning (Follow the Meta Leader, Finn et al. 2019): task t of the stream is episode (t, 0) of
      the train split (data.tasks.online_stream: shards in window order when streamed) and arrives at meta-step t;
      it is scored with the current meta-parameters before any update on it (the online metric), joins the buffer,
      and the step's meta-gradient is taken over it plus tasks drawn from the earlier buffer.
With `cluster.aggregation: allreduce`, 'backprop' runs as `allreduce`: the workers sum among themselves.
All are pure functions of (seed, step, slot), so a group lost with its worker is recomputed bit for bit.
"""

from __future__ import annotations

import math
import weakref
from typing import Any, Callable, Sequence

import numpy as np
import torch

from metascale.algorithms import es as es_math
from metascale.cluster.coordinator import StepResult, aggregate
from metascale.cluster.pool import split_slots
from metascale.config import JobSpec
from metascale.errors import MetascaleError

Estimator = Callable[[Any, Sequence[Sequence[int]], int, Any], StepResult]


def backprop(pool: Any, groups: Sequence[Sequence[int]], step: int, params_ref: Any) -> StepResult:
    return aggregate(pool.map("compute", groups, step, params_ref))


def allreduce(pool: Any, groups: Sequence[Sequence[int]], step: int, params_ref: Any) -> StepResult:
    """'backprop' with `cluster.aggregation: allreduce`: the workers sum among themselves (cluster/allreduce.py) and
    the coordinator receives rank 0's reduced sum; one in-driver worker has nothing to reduce."""
    from metascale.cluster.allreduce import AllReduce

    if not hasattr(pool, "actors"):
        return backprop(pool, groups, step, params_ref)
    if pool not in _GROUPS:
        _GROUPS[pool] = AllReduce()
    return aggregate(_GROUPS[pool].step(pool, groups, step, params_ref))


def es(pool: Any, groups: Sequence[Sequence[int]], step: int, params_ref: Any) -> StepResult:
    results = pool.map("fitness", groups, step, params_ref)
    settings = {r["es"] for r in results}
    if len(settings) != 1:
        raise MetascaleError(f"workers disagree on the ES settings (seed, sigma, shaping): {sorted(settings)}")
    seed, sigma, shaping = settings.pop()
    rows = [row for r in results for row in r["fitness"]]  # group order: independent of arrival order
    good = [row for row in rows if math.isfinite(row[1]) and math.isfinite(row[2])]
    params = _local(pool, params_ref)
    pairs, plus, minus = zip(*good) if good else ((), (), ())
    grads = es_math.estimate(params, seed, step, pairs, plus, minus, sigma, shaping) if good else {}
    fit = [f for _, a, b in good for f in (a, b)]
    metrics = {"es_fitness": sum(fit) / len(fit), "es_fitness_spread": max(fit) - min(fit)} if fit else {}
    return StepResult(
        grads=grads,
        tasks=sum(r["tasks"] for r in results) if good else 0,
        metrics=metrics,
        worker_s={r["worker"]: r["compute_s"] for r in results},
        data_s=sum(r["data_s"] for r in results),
        nonfinite=[(row[0], r["worker"]) for r in results for row in r["fitness"] if row not in good],
    )


def ftml(pool: Any, groups: Sequence[Sequence[int]], step: int, params_ref: Any) -> StepResult:
    arriving = step
    (online,) = pool.map("evaluate", [[0]], arriving, params_ref, "train", None)[0]  # episode (t, 0): task t
    batch = sum(len(g) for g in groups)
    rng = np.random.default_rng(np.random.SeedSequence([step, 0xF7]))
    earlier = rng.choice(arriving, size=min(batch - 1, arriving), replace=False).tolist() if arriving else []
    chosen = sorted([arriving, *earlier])
    slot_groups = [[chosen[i] for i in g] for g in split_slots(len(chosen), len(groups))]
    result = aggregate(pool.map("compute_online", slot_groups, arriving, params_ref))
    result.metrics.update({f"online_{k}": v for k, v in online.items()})
    return result


def _local(pool: Any, params_ref: Any) -> dict[str, torch.Tensor]:
    """The published meta-parameters on the driver (a local object-store read for Ray, the value itself inline)."""
    values = pool.ray.get(params_ref) if hasattr(pool, "ray") else params_ref
    return {k: torch.tensor(np.array(v)) for k, v in values.items()}


ESTIMATORS: dict[str, Estimator] = {"backprop": backprop, "es": es, "ftml": ftml}
_GROUPS: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()  # a pool's all-reduce group


def pick(spec: JobSpec) -> Estimator:
    """The job's estimator; 'backprop' aggregates by all-reduce when `cluster.aggregation` says so."""
    if spec.cluster.aggregation == "allreduce":
        return allreduce
    return ESTIMATORS[spec.outer.estimator]
