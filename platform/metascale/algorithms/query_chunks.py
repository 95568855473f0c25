"""The query pass in chunks: memory independent of the query-set size but for a few small maps, with the numbers of one
whole pass.

Block checkpointing still holds one block's activations for the whole query set at a time, and with per-task batch
norm the query set cannot simply be cut into pieces: every example's output depends on the batch statistics. Here
the statistics become explicit (models/norm.py `SplitBatch`): with them fixed, examples are independent. The model
runs segment by segment, each segment a `norm_chunks.ChunkedBlock` over the query set a chunk at a time (`chunk`
examples where the segments' boundaries are largest, proportionally more where they are smaller, all at once where
that reaches the query set: `norm_chunks.scaled_chunks`, as for mixed mode's support chunks):

- forward: each of the segment's norm layers' (mean, var) is collected over the chunks (layer l's needs layers < l's,
  so one pass per layer, each restarting at the segment's input), then the segment's output chunk by chunk;
- backward: per chunk, the vjp with the statistics held fixed gives the weights' gradient, the input's cotangent and
  every statistic's adjoint; then, from the segment's last norm layer down, each adjoint is pushed through the
  statistics' own definition (a sum over examples, so chunk by chunk too).

A segment is what the model hands `run_blocks` from one plain-tensor boundary to the next: Conv-4's layers, a
ResNet-12 stage (its parts hand on tuples: the stage input rides along for the shortcut). The whole query set's map
is kept at each segment boundary (after a stage's pooling: ~15 MB for ResNet-12's 75 queries at 84x84, 16-32-64-128),
so a layer's statistics restart at its stage, not at the input: O(L x L_segment) chunk passes instead of the O(L^2)
of one segment for the whole model (16 norm layers in ResNet-12; docs/benchmarks.md has the times). A model without
batch norm in its blocks, or without blocks, is one segment: nothing links its examples but what the segment's own
statistics make explicit, and no boundary is kept. Otherwise what runs before the blocks (the stem; the input itself
on Conv-4 and ResNet-12) is a segment of its own, and what follows them (pooling, the head) runs on the whole query
set's last boundary, with the loss.

The loss and its gradient are computed together in the forward (the gradient is saved, weight-sized), so the backward
only scales it: first order, which is what MAML's meta-gradient needs of the query pass. It does not run under
`vmap`, so the executor runs such tasks one by one. The query loss must be a mean over examples (cross-entropy, mean
squared error). `query_pass` is where the MAML family picks this, block checkpointing, or neither.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from metascale.algorithms.base import Params, task_loss
from metascale.algorithms.block_products import block_fn, has_batch_norm, split_at_blocks, stem_output
from metascale.algorithms.norm_chunks import block_op, per_example, scaled_chunks
from metascale.config import InnerLoopSpec
from metascale.data.tasks import Task
from metascale.models.checkpointing import blocks_replaced, checkpointed_blocks, plain_blocks

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
    # inside the Function grad mode is off and `needs_input_grad` ignores an enclosing no_grad: decide here
    need_grad = torch.is_grad_enabled() and any(p.requires_grad for p in params.values())
    return _ChunkedQuery.apply(f, names, x, y, chunk, need_grad, *(params[k] for k in names))


class _ChunkedQuery(torch.autograd.Function):
    @staticmethod
    def forward(ctx, f: Model, names: list[str], x: Tensor, y: Tensor, chunk: int, need_grad: bool, *tensors: Tensor):
        params = dict(zip(names, tensors))
        loss, out, grads = _Segments(f, params, x, chunk).run(params, y, need_grad)
        ctx.save_for_backward(*(grads[k] for k in names) if need_grad else ())
        ctx.mark_non_differentiable(out)
        return loss, out

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_out: Tensor):
        return (None, None, None, None, None, None, *(grad_loss * g for g in ctx.saved_tensors))


class _Segments:
    """The model as stem, segments and tail (see the module's docstring), each segment a `ChunkedBlock` over the query
    set a chunk at a time (or a `WholeBlock` where that chunk reaches the set), with the parameter keys it reads."""

    def __init__(self, f: Model, params: Params, x: Tensor, chunk: int):
        self.f, self.x = f, x
        # the model's own split where its blocks hold batch norm; else the whole model is one segment
        split = split_at_blocks(self._as_loss, params, {}, x[:1], x[:1])
        self.split = split if split is not None and has_batch_norm(split) else None
        found = [(list(params), self._whole, 1)] if self.split is None else self._split_segments(params, x[:1])
        sizes = scaled_chunks([n for _, _, n in found], chunk, len(x))
        self.segments = [(keys, block_op(fn, len(x), c)) for (keys, fn, _), c in zip(found, sizes)]

    def _split_segments(self, params: Params, one: Tensor) -> list[tuple[list[str], Callable, int]]:
        """Per segment of the split model: the keys it reads, its function, and the numbers per example of its largest
        boundary (which sets how many examples it runs at a time), from one example's pass, which also shows where
        segments end: at the blocks that hand on plain tensors."""
        assert self.split is not None
        found: list[tuple[list[str], Callable, int]] = []
        with torch.no_grad():
            h = one
            if not self.split.stem_is_input:
                h = self._stem(params, one)
                found.append((self.split.outside, self._stem, max(per_example(one), per_example(h))))
            group: list[tuple[list[str], Callable]] = []
            largest = 0
            for block in self.split.blocks:
                keys, fn = list(block.keys.values()), block_fn(self.split, block)
                out = fn({k: params[k] for k in keys}, h)
                largest, h = max(largest, per_example(h), per_example(out)), out
                group.append((keys, fn))
                if isinstance(h, Tensor):
                    found.append(([k for ks, _ in group for k in ks], _chain(group), largest))
                    group, largest = [], 0
        assert not group, "the model's blocks end in a tuple"
        return found

    def _as_loss(self, p: Params, h: Params, x: Tensor, y: Tensor) -> Tensor:
        """The model in the support loss's signature, which block_products splits (its value is never a loss here)."""
        return self.f(p, x)

    def _whole(self, theta: Params, x: Tensor) -> Tensor:
        with plain_blocks():  # torch.func refuses checkpointing's saved-tensor hooks
            return self.f(theta, x)

    def _stem(self, theta: Params, x: Tensor) -> Tensor:
        return stem_output(self._as_loss, theta, {}, x, x)

    def _tail(self, theta: Params, h: Tensor) -> Tensor:
        """The model's outputs from its last boundary: what follows its blocks (the stem runs again on the whole query
        set and the blocks' replacement drops its result: free where the stem is the input, as on every model with
        batch norm in the registry); without a split, the boundary is the output."""
        if self.split is None:
            return h
        with blocks_replaced(lambda blocks, h0: h):
            return self.f(theta, self.x)

    def run(self, params: Params, y: Tensor, need_grad: bool) -> tuple[Tensor, Tensor, Params]:
        """(loss, outputs, dloss/dparams); the last empty unless `need_grad`."""
        h, bounds = self.x, []
        for keys, op in self.segments:
            theta = {k: params[k] for k in keys}
            with torch.no_grad():
                h_next, stats = op.forward(theta, h)
            bounds.append((theta, h, stats))
            h = h_next
        outside = {k: params[k] for k in self.split.outside} if self.split is not None else {}
        if not need_grad:
            with torch.no_grad():
                out = self._tail(outside, h)
            return task_loss(out, y), out, {}
        (out, loss), vjp = torch.func.vjp(lambda th, hh: _with_loss(self._tail(th, hh), y), outside, h)
        grads, c = vjp((torch.zeros_like(out), torch.ones_like(loss)))
        grads = {k: grads.get(k, torch.zeros_like(p)) for k, p in params.items()}
        for (theta, h_in, stats), (_, op) in zip(reversed(bounds), reversed(self.segments)):
            g, c = op.pullback(theta, h_in, stats, c)
            for k, t in g.items():
                grads[k] += t
        return loss, out, grads


def _with_loss(out: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    return out, task_loss(out, y)


def _chain(group: list) -> Callable[[Params, Tensor], Tensor]:
    """Blocks run one after another as one segment."""

    def run(theta: Params, h):
        for keys, fn in group:
            h = fn({k: theta[k] for k in keys}, h)
        return h

    return run
