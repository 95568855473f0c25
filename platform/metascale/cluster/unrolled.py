"""Truncated-unroll estimators on the workers (`outer.estimator: pes | tbptt`, algorithms/pes.py) for the learned
optimiser (algorithms/lopt.py).

Coordinator side: each meta-step publishes one object, the meta-parameters of the last W steps (the coordinator's
history; the optimiser MLP is a few thousand numbers, so this is a few hundred KB at most), and sends one 'unroll'
WorkItem per group of particles. 'pes' gets (pair, L+, L-) scalars back and regenerates each pair's accumulated
noise to form the estimate; 'tbptt' gets summed gradients, aggregated like backprop's.

Worker side (`work`): the replica keeps its particles' inner states between meta-steps. A particle it does not hold
at the step asked for is replayed from its last reset from the history, so a lost worker's particles continue on
another worker exactly as they would have: the estimate, hence the run, does not depend on which worker ran what.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from metascale.algorithms import pes as pes_math
from metascale.cluster.coordinator import StepResult, aggregate
from metascale.cluster.estimators import items
from metascale.cluster.messages import NumpyParams, WorkItem, WorkResult
from metascale.config import JobSpec


def schedule(spec: JobSpec) -> pes_math.Schedule:
    cfg = spec.outer.pes
    return pes_math.Schedule(
        spec.seed, spec.algorithm.inner.steps // cfg.truncation, cfg.truncation, cfg.sigma, cfg.stagger
    )


def _run(spec: JobSpec, coord: Any, pool: Any, step: int) -> list[WorkResult]:
    if step not in coord.history:
        raise RuntimeError(f"meta-step {step}'s parameters were not published (call coord.published() first)")
    return pool.run(items("unroll", step, spec.outer.meta_batch, pool.size), pool.put(coord.history))


def pes(spec: JobSpec, coord: Any, pool: Any, step: int, params: Any) -> StepResult:
    """PES: `outer.meta_batch` antithetic particle pairs; workers return only their truncation losses."""
    results = _run(spec, coord, pool, step)
    rows = [row for r in results for row in r.fitness]  # item order
    good = [row for row in rows if math.isfinite(row[1]) and math.isfinite(row[2])]
    theta = {k: torch.from_numpy(v) for k, v in coord.history[step].items()}
    s = schedule(spec)
    grads = pes_math.estimate(theta, spec.seed, step, good, s.sigma, s.truncations, s.stagger) if good else {}
    losses = [f for _, a, b in good for f in (a, b)]
    metrics = {"unroll_loss": sum(losses) / len(losses)} if losses else {}
    metrics["replayed_truncations"] = sum(r.metrics.get("replayed_truncations", 0.0) for r in results)
    return StepResult(
        grads=grads,
        tasks=2 * len(good),
        metrics=metrics,
        worker_s={r.worker: r.compute_s for r in results},
        data_s=sum(r.data_s for r in results),
        nonfinite=[(row[0], r.worker) for r in results for row in r.fitness if row not in good],
    )


def tbptt(spec: JobSpec, coord: Any, pool: Any, step: int, params: Any) -> StepResult:
    """Truncated backprop: the mean over particles of the gradient through the current truncation only."""
    results = _run(spec, coord, pool, step)
    replayed = sum(r.metrics.pop("replayed_truncations", 0.0) for r in results)
    out = aggregate(results)
    out.metrics["replayed_truncations"] = replayed
    return out


ESTIMATORS = {"pes": pes, "tbptt": tbptt}


class _Tasks:
    """A particle's inner task for its unroll index u: episode (u, particle) of the train split."""

    def __init__(self, replica: Any, particle: int):
        self.replica, self.particle = replica, particle

    def __call__(self, unroll: int) -> Any:
        r = self.replica
        return r.source("train").batch(unroll, [self.particle]).to(r.device, r.dtype)[0]


def work(replica: Any, item: WorkItem, history: dict[int, NumpyParams], out: WorkResult) -> dict[str, torch.Tensor]:
    """One 'unroll' item on a replica: one truncation of each particle in `item.slots`, from held or replayed
    states. Fills `out` (pes: fitness rows) and returns the summed gradient (tbptt; empty for pes)."""
    spec, mode = replica.spec, replica.spec.outer.estimator
    if replica.particles is None:
        replica.particles = pes_math.Particles(replica.alg, schedule(spec), mode)
    particles: pes_math.Particles = replica.particles
    thetas: dict[int, dict[str, torch.Tensor]] = {}

    def theta_at(s: int) -> dict[str, torch.Tensor]:
        if s not in thetas:
            thetas[s] = replica._params(history[s])
        return thetas[s]

    before = particles.replayed
    grads: dict[str, torch.Tensor] = {}
    loss_sum = 0.0
    for particle in item.slots:
        a, b = particles.advance(particle, item.step, theta_at, _Tasks(replica, particle))
        if mode == "pes":
            out.fitness.append((particle, a, b))  # type: ignore[arg-type]
            continue
        finite = math.isfinite(a) and all(bool(torch.isfinite(g).all()) for g in b.values())  # type: ignore[union-attr]
        if not finite:
            out.nonfinite_slots.append(particle)
            continue
        for k, g in b.items():  # type: ignore[union-attr]
            grads[k] = grads[k] + g if k in grads else g.clone()
        loss_sum += a  # type: ignore[operator]
        out.tasks += 1
    if mode == "pes":
        out.tasks = 2 * len(item.slots)
    else:
        out.metrics["unroll_loss"] = loss_sum
    out.metrics["replayed_truncations"] = float(particles.replayed - before)
    return grads
