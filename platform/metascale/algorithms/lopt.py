"""A learned optimiser (`algorithm.name: lopt`): a small MLP applied to every inner parameter on its own, in the
style of learned_optimization's `MLPLOpt` (Metz et al. 2019, "Understanding and correcting pathologies in the
training of learned optimizers"; google/learned_optimization, learned_optimizers/mlp_lopt.py).

Per parameter the MLP reads the gradient, the parameter and momenta at several timescales, each normalised by its
second moment over the tensor; the gradient and the (bias-corrected) momenta divided by the root of the element's own
second-moment average (Adam's m / sqrt(v), as the rms features of learned_optimization's `AdafacMLPLOpt`,
adafac_mlp_lopt.py: otherwise the MLP must learn per-element scaling from tensor-normalised inputs); and a tanh
embedding of the inner step count (the same for every parameter). It outputs a direction d and a log-magnitude m;
the step is d * exp(m * exp_mult) * step_mult. Meta-parameters are the
MLP's weights alone: the inner model (`model`, an MLP over the flattened inputs) starts from a fresh random
initialisation for every inner task. Pure functions over parameter dicts, no Ray inside.

The inner task is an episode: train on its support set (full batch) with the learned optimiser; the meta-objective
of an unroll is the mean support loss after each step (learned_optimization's default "train loss" objective), and
evaluation reports the query metrics after `steps` steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metascale.algorithms.base import MetaAlgorithm, Params, TaskOutput, register, task_loss, task_metrics
from metascale.config import AlgorithmSpec
from metascale.data.tasks import Task

DECAYS = (0.5, 0.9, 0.99, 0.999)  # momentum timescales (mlp_lopt.py uses 0.1 ... 0.9999)
BETA2 = 0.999  # the second-moment accumulator's decay (Adam's), kept as the last channel of the momenta
TIMESCALES = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)  # the step-count embedding tanh(t / s - 1)
# gradient, parameter, momenta; the gradient and momenta over the root second moment (Adam-style, per element);
# then the step embedding
FEATURES = 2 + 2 * len(DECAYS) + 1 + len(TIMESCALES)
_INIT_STREAM = 0x10B7  # separates inner-model initialisations from the task and noise streams


@dataclass(frozen=True)
class InnerState:
    """An inner training run between two of its steps: the model's weights, the momenta, the steps taken."""

    params: Params
    momenta: Params  # per parameter: [..., len(DECAYS)]
    t: int


def init_mlp(hidden: int, layers: int = 2) -> Params:
    """The optimiser MLP's weights (from torch's global RNG: the coordinator seeds it); the last layer starts small
    so the first updates are gentle, as haiku's default initialisation with fan-in scaling makes them."""
    sizes = [FEATURES] + [hidden] * layers + [2]
    out: Params = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        scale = 1.0 / math.sqrt(a) if i < layers else 0.01 / math.sqrt(a)
        out[f"lopt.w{i}"] = torch.randn(a, b) * scale
        out[f"lopt.b{i}"] = torch.zeros(b)
    return out


def _mlp(theta: Params, x: Tensor) -> Tensor:
    n = sum(k.startswith("lopt.w") for k in theta)
    for i in range(n):
        x = x @ theta[f"lopt.w{i}"] + theta[f"lopt.b{i}"]
        if i < n - 1:
            x = F.relu(x)
    return x


def opt_step(theta: Params, state: InnerState, grads: Params, step_mult: float, exp_mult: float) -> InnerState:
    """One step of the learned optimiser: new weights and accumulators (differentiable w.r.t. theta)."""
    ref = next(iter(theta.values()))
    decays = torch.tensor(DECAYS + (BETA2,), dtype=ref.dtype, device=ref.device)
    times = torch.tensor(TIMESCALES, dtype=ref.dtype, device=ref.device)
    embed = torch.tanh(state.t / times - 1.0)
    correction = 1 - decays ** (state.t + 1)  # Adam's bias correction of the accumulators
    params, momenta = {}, {}
    for k, p in state.params.items():
        g = grads[k]
        acc = state.momenta[k] * decays + (1 - decays) * torch.cat(
            [g.unsqueeze(-1).expand(*g.shape, len(DECAYS)), g.square().unsqueeze(-1)], -1
        )
        m, v = acc[..., :-1], acc[..., -1:]
        rsqrt = torch.rsqrt(v / correction[-1] + 1e-16)
        adam = torch.cat([g.unsqueeze(-1), m / correction[:-1]], -1) * rsqrt
        x = torch.cat([g.unsqueeze(-1), p.unsqueeze(-1), m], -1)
        x = x * torch.rsqrt(1e-5 + x.square().mean(dim=tuple(range(p.dim())), keepdim=True))
        x = torch.cat([x, adam, embed.expand(*p.shape, len(TIMESCALES))], -1)
        out = _mlp(theta, x)
        params[k] = p - out[..., 0] * torch.exp(out[..., 1] * exp_mult) * step_mult
        momenta[k] = acc
    return InnerState(params, momenta, state.t + 1)


def init_inner(
    shapes: dict[str, torch.Size], key: tuple[int, ...], dtype: torch.dtype, device: torch.device | str = "cpu"
) -> InnerState:
    """A fresh inner model, a pure function of `key` (e.g. (seed, particle, reset)): weights uniform in
    +-1/sqrt(fan_in) (nn.Linear's scale), biases zero, momenta zero."""
    state = np.random.SeedSequence([*key, _INIT_STREAM]).generate_state(2, dtype=np.uint32)
    gen = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
    params = {}
    for k, shape in shapes.items():
        if len(shape) < 2:
            params[k] = torch.zeros(shape, dtype=dtype)
        else:
            bound = 1.0 / math.sqrt(math.prod(shape[1:]))
            params[k] = (torch.rand(shape, generator=gen, dtype=dtype) * 2 - 1) * bound
    params = {k: v.to(device) for k, v in params.items()}
    return InnerState(params, {k: v.new_zeros(*v.shape, len(DECAYS) + 1) for k, v in params.items()}, 0)


@register
class LearnedOptimizer(MetaAlgorithm):
    """Meta-parameters: the optimiser MLP. `task_objective` trains a fresh inner model on the support set for
    `steps` (default `inner.steps`) learned-optimiser steps and scores the query set: the full-unroll objective that
    `outer.estimator: backprop` or `es` optimise directly and `pes`/`tbptt` in truncations (algorithms/pes.py)."""

    name = "lopt"

    def __init__(self, spec: AlgorithmSpec, model: nn.Module, data: Any = None):
        super().__init__(spec, model, data)
        self.shapes = {k: v.shape for k, v in model.named_parameters()}
        self.cfg = spec.lopt

    def init(self, model_params: Params) -> Params:
        return init_mlp(self.cfg.hidden, self.cfg.layers)

    def model_params(self, meta_params: Params) -> Params:
        return {}  # no model weights are meta-learned: each task starts from a fresh initialisation

    def loss(self, params: Params, x: Tensor, y: Tensor) -> Tensor:
        return task_loss(self.f(params, x.flatten(1)), y)

    def train_steps(self, theta: Params, state: InnerState, task: Task, steps: int) -> tuple[InnerState, Tensor]:
        """`steps` learned-optimiser steps on the support set; the mean support loss after each step. Differentiable
        w.r.t. theta when grad mode is on (truncated backprop), plain otherwise (PES, evaluation)."""
        keep = torch.is_grad_enabled()
        total = torch.zeros((), dtype=task.support_x.dtype, device=task.support_x.device)
        for _ in range(steps):
            with torch.enable_grad():
                params = {
                    k: v if keep and v.requires_grad else v.detach().requires_grad_(True)
                    for k, v in state.params.items()
                }
                loss = self.loss(params, task.support_x, task.support_y)
                grads = torch.autograd.grad(loss, list(params.values()), create_graph=keep)
            state = opt_step(
                theta,
                InnerState(params, state.momenta, state.t),
                dict(zip(params, grads)),
                self.cfg.step_mult,
                self.cfg.exp_mult,
            )
            total = total + self.loss(state.params, task.support_x, task.support_y)
        return state, total / max(steps, 1)

    def fresh(self, key: tuple[int, ...], task: Task) -> InnerState:
        return init_inner(self.shapes, key, task.support_x.dtype, task.support_x.device)

    def task_objective(self, meta_params: Params, task: Task, steps: int | None = None) -> TaskOutput:
        steps = self.spec.inner.steps if steps is None else steps
        state, _ = self.train_steps(meta_params, self.fresh((0,), task), task, steps)
        out = self.f(state.params, task.query_x.flatten(1))
        loss = task_loss(out, task.query_y)
        return TaskOutput(loss, task_metrics(out, task.query_y, loss))
