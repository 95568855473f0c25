"""Evolution strategies (Salimans et al. 2017) as a meta-optimiser: the pure math, with no Ray inside.

The search distribution is N(theta, sigma^2 I). Pair i of meta-step t perturbs theta by +/- sigma * eps_i, where
eps_i is drawn from a generator seeded by (job seed, t, i) alone: a counter-based stream, so a worker that scores
pair i and the coordinator that builds the estimate regenerate the same eps_i without ever sending it. Workers send
only (i, F+, F-) scalars, whatever the model's size.

With antithetic pairs, grad E[F(theta + sigma eps)] is estimated by sum_i (F+_i - F-_i) eps_i / (2 N sigma); for a
quadratic F the smoothed gradient equals the true gradient, so the estimate is unbiased there (tests check it).
Centred-rank shaping (ranks of all 2N fitnesses mapped to [-0.5, 0.5]) replaces raw fitness to make the update
invariant to the objective's scale and robust to outliers, at the price of that unbiasedness.
"""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np
import torch
from torch import Tensor

from metascale.algorithms.base import MetaAlgorithm, Params
from metascale.data.tasks import TaskBatch

Shaping = Literal["centred_rank", "none"]
_STREAM = 0xE5  # separates the ES noise streams from the task streams of data/tasks.py


def noise(params: Params, seed: int, step: int, pair: int) -> Params:
    """eps for `pair` at `step`: standard normal, drawn on the CPU in float32 (bit-identical on every host), then cast
    to params' dtype. Always float32: torch draws different numbers for float64, and the coordinator regenerates the
    noise from its float32 meta-parameters while float64 workers (executor.dtype) perturbed theirs."""
    state = np.random.SeedSequence([seed, step, pair, _STREAM]).generate_state(2, dtype=np.uint32)
    gen = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
    out = {}
    for k, v in params.items():
        out[k] = torch.randn(v.shape, generator=gen, dtype=torch.float32).to(v.device, v.dtype)
    return out


def perturb(params: Params, eps: Params, scale: float) -> Params:
    return {k: v + scale * eps[k] for k, v in params.items()}


def centred_ranks(values: Tensor) -> Tensor:
    """Ranks 0..n-1 (ties broken by position) mapped linearly onto [-0.5, 0.5]; the lowest value gets -0.5."""
    n = values.numel()
    ranks = torch.empty(n, dtype=torch.float64)
    ranks[values.flatten().argsort(stable=True)] = torch.arange(n, dtype=torch.float64)
    return (ranks / max(n - 1, 1) - 0.5).view(values.shape)


def estimate(
    params: Params,
    seed: int,
    step: int,
    pairs: Sequence[int],
    plus: Sequence[float],
    minus: Sequence[float],
    sigma: float,
    shaping: Shaping = "centred_rank",
) -> Params:
    """The gradient estimate of E[F] at `params` from the fitnesses of antithetic pairs (noise regenerated here).

    F is minimised by the outer optimiser, so this is a descent direction's negative, like a backprop gradient."""
    f = torch.tensor([list(plus), list(minus)], dtype=torch.float64)
    if shaping == "centred_rank":
        f = centred_ranks(f)
    grad = {k: torch.zeros_like(v) for k, v in params.items()}
    for i, pair in enumerate(pairs):
        weight = float(f[0, i] - f[1, i]) / (2 * len(pairs) * sigma)
        for k, e in noise(params, seed, step, pair).items():
            grad[k].add_(e, alpha=weight)
    return grad


def fitness(alg: MetaAlgorithm, meta_params: Params, batch: TaskBatch, objective: str) -> float:
    """The meta-objective to minimise, any algorithm's post-adaptation query loss or error (1 - accuracy), averaged
    over `batch`. Needs no gradient of it: that is what lets ES optimise non-differentiable objectives."""
    key = "loss" if objective == "loss" else "accuracy"
    with torch.no_grad():
        values = [float(alg.task_objective(meta_params, task).metrics[key]) for task in batch.tasks()]
    mean = sum(values) / len(values)
    return mean if objective == "loss" else 1.0 - mean
