"""The inner loop: plain gradient descent on a task's support loss, differentiable w.r.t. its starting point.

Two gradient engines, same numbers: `torch.autograd.grad` (create_graph for second order) in the per-task path, and
`torch.func.grad` when the executor batches tasks with `vmap` (autograd.grad cannot run under vmap). With
`checkpoint=True` each step is recomputed in the backward pass (`use_reentrant=False`: the reentrant variant breaks
`autograd.grad`), so memory stays flat in the number of steps; `torch.func.grad` cannot run under checkpointing
(it refuses saved-tensor hooks), so checkpointed inner loops always take the per-task path.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint as recompute

from metascale.algorithms.base import Params
from metascale.algorithms.mixed_mode import SupportLoss, mixed_descent
from metascale.config import InnerLoopSpec
from metascale.models.norm import tasks_batched


def adapt(
    loss_fn: SupportLoss,
    params: Params,
    hparams: Params,
    x: Tensor,
    y: Tensor,
    *,
    steps: int,
    lr: float | Params,
    first_order: bool,
    inner: InnerLoopSpec,
) -> Params:
    """The inner loop on the support set (x, y) in the mode `inner.differentiation` names: `reverse` records the
    graph of every step (differentiated by autograd's double backward), `mixed` keeps only the steps' parameters and
    sweeps back with forward-over-reverse Hessian-vector products (algorithms/mixed_mode.py). Same numbers. `hparams`
    are the meta-parameters the support loss reads besides the weights. Without a meta-graph to build (first order,
    evaluation, no steps) both are the plain loop."""
    if inner.differentiation == "mixed" and not first_order and steps and torch.is_grad_enabled():
        return mixed_descent(
            loss_fn,
            params,
            hparams,
            x,
            y,
            steps=steps,
            lr=lr,
            stride=inner.mixed_stride,
            support_chunk=inner.support_chunk,
            blocks=inner.mixed_blocks,
        )
    return gradient_descent(
        lambda p: loss_fn(p, hparams, x, y),
        params,
        steps=steps,
        lr=lr,
        first_order=first_order,
        checkpoint=inner.checkpoint != "none",
    )


def gradient_descent(
    loss_fn: Callable[[Params], torch.Tensor],
    params: Params,
    *,
    steps: int,
    lr: float | Params,
    first_order: bool = False,
    checkpoint: bool = False,
) -> Params:
    """`steps` updates p <- p - lr * dL/dp. `lr` is a float or a dict of per-parameter rates (Meta-SGD).

    first_order: the inner gradients are treated as constants (FOMAML), so nothing of the inner backward is kept.
    Under `torch.no_grad()` (evaluation) the loop still adapts, keeping no graph.
    """
    first_order = first_order or not torch.is_grad_enabled()
    grad_fn = _functorch_grad if tasks_batched() else _autograd_grad

    def step(fast: Params) -> Params:
        grads = grad_fn(loss_fn, fast, first_order)
        return {k: p - (lr[k] if isinstance(lr, dict) else lr) * grads[k] for k, p in fast.items()}

    for _ in range(steps):
        params = recompute(step, params, use_reentrant=False) if checkpoint and not first_order else step(params)
    return params


def _autograd_grad(loss_fn: Callable[[Params], torch.Tensor], fast: Params, first_order: bool) -> Params:
    with torch.enable_grad():
        inputs = {k: v if v.requires_grad and not first_order else v.detach().requires_grad_() for k, v in fast.items()}
        names = list(inputs)
        grads = torch.autograd.grad(
            loss_fn(inputs), [inputs[k] for k in names], create_graph=not first_order, allow_unused=True
        )
    return {k: torch.zeros_like(inputs[k]) if g is None else g for k, g in zip(names, grads)}


def _functorch_grad(loss_fn: Callable[[Params], torch.Tensor], fast: Params, first_order: bool) -> Params:
    if first_order:
        with torch.no_grad():  # func.grad still differentiates; the outer graph just does not record it
            return torch.func.grad(loss_fn)(fast)
    return torch.func.grad(loss_fn)(fast)
