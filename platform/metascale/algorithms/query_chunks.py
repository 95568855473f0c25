"""The query pass in chunks: memory independent of the query-set size, with the numbers of one whole pass.

Block checkpointing still holds one block's activations for the whole query set at a time, and with per-task batch
norm the query set cannot simply be cut into pieces: every example's output depends on the batch statistics. Here
the statistics become explicit (models/norm.py `SplitBatch`): with them fixed, examples are independent, so

- forward: each norm layer's (mean, var) is collected chunk by chunk (layer l's needs layers < l's), then the loss;
- backward: one pass gives the loss's gradient w.r.t. the weights and, directly, w.r.t. every layer's statistics;
  then, from the last norm layer down, each layer's statistics' adjoint is pushed through the statistics' own
  definition (a sum over examples, so chunk by chunk too) into the weights and the earlier layers' statistics.

That is 1 + (number of norm layers) chunked backward passes of growing depth instead of one pass, and nothing but a
chunk's activations is alive at a time. Exact for models whose only link between examples is `TaskBatchNorm` (every
model in the registry); the query loss must be a mean over examples (cross-entropy, mean squared error). The backward
is first order (what MAML's meta-gradient needs of the query pass); it does not run under `vmap`, so the executor
runs such tasks one by one. `query_pass` is where the MAML family picks this, block checkpointing, or neither.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from metascale.algorithms.base import Params, task_loss
from metascale.config import InnerLoopSpec
from metascale.data.tasks import Task
from metascale.models.checkpointing import checkpointed_blocks
from metascale.models.norm import SplitBatch, batch_statistics, run_split

Model = Callable[[Params, Tensor], Tensor]


def query_pass(f: Model, params: Params, task: Task, inner: InnerLoopSpec) -> tuple[Tensor, Tensor]:
    """(loss, outputs) of the adapted model on the query set, holding what `inner` asks for at a time: a chunk's
    activations (`query_chunk`), one block's (`checkpoint: all`), or all of them."""
    if inner.query_chunk is not None:
        return chunked_query(f, params, task.query_x, task.query_y, inner.query_chunk)
    with checkpointed_blocks(inner.checkpoint == "all"):
        out = f(params, task.query_x)
    return task_loss(out, task.query_y), out


def chunked_query(f: Model, params: Params, x: Tensor, y: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
    """(mean query loss, outputs) of `f(params, x)` computed `chunk` examples at a time; the loss is differentiable
    w.r.t. `params`, the outputs are not."""
    names = list(params)
    return _ChunkedQuery.apply(f, names, x, y, chunk, *(params[k] for k in names))


class _ChunkedQuery(torch.autograd.Function):
    @staticmethod
    def forward(ctx, f: Model, names: list[str], x: Tensor, y: Tensor, chunk: int, *tensors: Tensor):
        params = dict(zip(names, tensors))
        stats = batch_statistics(lambda xc, split: run_split(f, split, params, xc), list(x.split(chunk)), len(x))
        out = torch.cat([run_split(f, SplitBatch(stats, len(x)), params, xc) for xc in x.split(chunk)])
        ctx.f, ctx.names, ctx.chunk, ctx.layers = f, names, chunk, len(stats)
        ctx.save_for_backward(x, y, *tensors, *(t for pair in stats for t in pair))
        ctx.mark_non_differentiable(out)
        return task_loss(out, y), out

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_out: Tensor):
        x, y, *saved = ctx.saved_tensors
        n = len(ctx.names)
        with torch.enable_grad():
            params = {k: t.detach().requires_grad_() for k, t in zip(ctx.names, saved[:n])}
            flat = [t.detach().requires_grad_() for t in saved[n:]]
            stats = [(flat[2 * i], flat[2 * i + 1]) for i in range(ctx.layers)]
            grads = {k: torch.zeros_like(p) for k, p in params.items()}
            adjoint = [torch.zeros_like(t) for t in flat]

            def accumulate(value: Tensor, upto: int) -> None:
                """Adds d value / d (weights, statistics of the first `upto` layers)."""
                inputs = [*params.values(), *flat[: 2 * upto]]
                for i, g in enumerate(torch.autograd.grad(value, inputs, allow_unused=True)):
                    if g is not None:
                        (grads[ctx.names[i]] if i < n else adjoint[i - n]).add_(g)

            for xc, yc in zip(x.split(ctx.chunk), y.split(ctx.chunk)):  # the loss, statistics held fixed
                out = run_split(ctx.f, SplitBatch(stats, len(x)), params, xc)
                accumulate(task_loss(out, yc) * (len(xc) / len(x)), ctx.layers)
            for layer in reversed(range(ctx.layers)):  # each layer's statistics, through their definition
                a_mean, a_var = adjoint[2 * layer], adjoint[2 * layer + 1]
                for xc in x.split(ctx.chunk):
                    share_mean, share_var = run_split(ctx.f, SplitBatch(stats, len(x), stop_at=layer), params, xc)
                    accumulate((a_mean * share_mean).sum() + (a_var * share_var).sum(), layer)
        return (None, None, None, None, None, *(grad_loss * grads[k] for k in ctx.names))
