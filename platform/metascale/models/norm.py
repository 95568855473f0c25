"""Per-task batch normalisation, as in the MAML paper: statistics from the current batch only, no running stats;
and a layer norm that is exact under vmap (TaskLayerNorm).

`nn.BatchNorm2d`'s native kernel gives wrong second-order gradients under `vmap(grad(...))` (measured with torch
2.13: relative error 0.8% at 1 inner step, 18% at 5, float64; pytorch/functorch#534), so inside vmap the norm is
written out in basic ops, which agree to ~1e-13. Outside vmap the native kernel is correct and faster. The executor
marks vmapped code with `batched_tasks()`, which also tells the inner loop to take its gradients with
`torch.func.grad`.

Under `split_batch(...)` a batch can also pass through a model in chunks with the numbers of one whole pass
(algorithms/query_chunks.py): each norm layer, in call order, normalises with statistics given from outside and
reports its chunk's share of them, so the only link between examples becomes explicit.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_BATCHED = contextvars.ContextVar("metascale_tasks_batched", default=False)
_SPLIT: contextvars.ContextVar["SplitBatch | None"] = contextvars.ContextVar("metascale_split_batch", default=None)


@contextlib.contextmanager
def batched_tasks(enabled: bool = True) -> Iterator[None]:
    """Marks code that runs under `vmap` over tasks."""
    token = _BATCHED.set(enabled)
    try:
        yield
    finally:
        _BATCHED.reset(token)


def tasks_batched() -> bool:
    return _BATCHED.get()


class TaskBatchNorm(nn.Module):
    """Batch norm over every dim but the channel dim (dim 1), with a learnable affine transform."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        # Under bf16 autocast, normalise in the weights' precision (float32), the usual mixed-precision recipe. It also
        # keeps forward mode right: on a bf16 input the native kernel returns bf16 but its tangent in float32, and the
        # next convolution then refuses the pair (torch 2.13; mixed mode's whole-model products under autocast).
        x = x.to(self.weight.dtype)
        split = _SPLIT.get()
        if split is not None:
            return split.normalise(x, self.weight, self.bias, self.eps)
        if not tasks_batched():
            return F.batch_norm(x, None, None, self.weight, self.bias, training=True, eps=self.eps)
        dims = [0, *range(2, x.dim())]
        mean = x.mean(dim=dims)
        var = ((x - mean.view(_channels(x))) ** 2).mean(dim=dims)
        return _normalise(x, mean, var, self.weight, self.bias, self.eps)


class TaskLayerNorm(nn.LayerNorm):
    """`nn.LayerNorm` whose second-order gradients are right under `vmap`: there the affine transform is applied
    outside the kernel, `F.layer_norm(x, shape) * weight + bias`; elsewhere the native fused kernel (same function).

    Why (torch 2.13; pytorch main's aten/src/ATen/functorch/BatchRulesNorm.cpp still has it; pytorch/functorch#534,
    open, is about these norm rules): the vmap rule `native_layer_norm_backward_plumbing` computes the weight's
    gradient as `sum((input - mean) * rstd * grad_out)` from the forward's saved `mean` and `rstd`, which autograd
    treats as constants (native_layer_norm's statistics are non-differentiable outputs). A gradient taken *through*
    that weight gradient (grad of vmap of grad, or autograd.grad of vmap of func.grad: second-order MAML under the
    vmap executor) then misses d(mean, rstd)/d(input) whenever the input depends on what is differentiated. The
    input's gradient goes through the native kernel, whose double backward is exact, so keeping the weight out of
    the kernel removes the wrong term. Standalone repro (float64, seed 0: the two results differ by 0.09 relative;
    with `F.layer_norm(x * w, (4,)) * w` in `f` they agree to ~1e-16):

        f = lambda w, x: F.layer_norm(x * w, (4,), w).pow(3).sum()
        one = lambda w, x, c: (torch.func.grad(f)(w, x) * c).sum()
        w, xs, cs = 1 + 0.1 * torch.randn(4), torch.randn(2, 4), torch.randn(2, 4)
        torch.func.grad(lambda w: torch.func.vmap(one, (None, 0, 0))(w, xs, cs).sum())(w)
        torch.func.grad(lambda w: sum(one(w, x, c) for x, c in zip(xs, cs)))(w)  # differs from the line above
    """

    def forward(self, x: Tensor) -> Tensor:
        if not tasks_batched() or self.weight is None:
            return super().forward(x)
        out = F.layer_norm(x, self.normalized_shape, None, None, self.eps) * self.weight
        return out if self.bias is None else out + self.bias


def _channels(x: Tensor) -> list[int]:
    """The shape that broadcasts a per-channel vector over `x` (channels in dim 1)."""
    return [1, -1] + [1] * (x.dim() - 2)


def _normalise(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """x * scale + shift with per-channel scale = weight / sqrt(var + eps), shift = bias - mean * scale (the native CPU
    kernel's arithmetic): two ops on x-sized tensors, where (x - mean) * rsqrt * weight + bias takes four, each kept
    for the backward (and, under forward mode, with a tangent)."""
    shape = _channels(x)
    scale = torch.rsqrt(var + eps) * weight
    return x * scale.view(shape) + (bias - mean * scale).view(shape)


class StopPass(Exception):
    """Ends a chunk's forward pass at the norm layer `SplitBatch.stop_at`, carrying what that layer recorded."""

    def __init__(self, record: Sums | tuple[Tensor, Tensor]):
        super().__init__()
        self.record = record


@dataclass(frozen=True)
class Sums:
    """A chunk's part of a norm layer's batch statistics: per-channel sums of x and x^2 in float64, differentiable
    (forward mode too: mixed mode's products carry tangents through the statistics), and their count; `reads`: which
    of the pass's inputs the layer normalises itself (its index in `SplitBatch.inputs`), if any."""

    s1: Tensor
    s2: Tensor
    count: int
    dtype: torch.dtype
    reads: int | None = None

    def __add__(self, other: Sums) -> Sums:
        reads = self.reads if self.reads == other.reads else None
        return Sums(self.s1 + other.s1, self.s2 + other.s2, self.count + other.count, self.dtype, reads)

    def statistics(self) -> tuple[Tensor, Tensor]:
        """(mean, biased var) in the layer's dtype: E[x^2] - mean^2 is taken in float64, where its cancellation costs
        nothing at float32 precision, so one pass over the chunks gives both."""
        mean = self.s1 / self.count
        return mean.to(self.dtype), (self.s2 / self.count - mean * mean).clamp_min(0).to(self.dtype)


class SplitBatch:
    """Per-task batch norm for one chunk of a batch of `total` examples.

    Layers whose (mean, var) are in `stats` normalise with them and need nothing from other chunks. The layer at
    index `stop_at` ends the pass (`StopPass`) with its chunk's record: its `Sums` when its statistics are not known
    yet (they are being collected), else its differentiable share of them, (sum x / M, sum (x - mean)^2 / M) with M
    the batch's count per channel (how the statistics' adjoints reach the weights and the earlier layers'
    statistics; `share_pullback` is its vjp). `inputs`: the tensors the pass starts from, to tell which layer reads one
    of them unchanged. `share_of`: a layer whose share is recorded (`share`) while the pass goes on, so that one vjp
    takes the block output's adjoint and that share's together (algorithms/norm_chunks.py)."""

    def __init__(
        self,
        stats: list[tuple[Tensor, Tensor]],
        total: int,
        stop_at: int | None = None,
        inputs: tuple = (),
        share_of: int | None = None,
    ):
        self.stats, self.total, self.stop_at, self.inputs, self.layer = stats, total, stop_at, inputs, 0
        self.share_of, self.share = share_of, None

    def normalise(self, x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
        i, self.layer = self.layer, self.layer + 1
        if i == self.stop_at:
            if i >= len(self.stats):
                x64, reads = x.double(), next((j for j, t in enumerate(self.inputs) if t is x), None)
                dims, count = [0, *range(2, x.dim())], x.shape[0] * x[0, 0].numel()
                raise StopPass(Sums(x64.sum(dims), (x64 * x64).sum(dims), count, x.dtype, reads))
            raise StopPass(self._share(x, i))
        if i == self.share_of:
            self.share = self._share(x, i)
        return _normalise(x, *self.stats[i], weight, bias, eps)

    def _share(self, x: Tensor, i: int) -> tuple[Tensor, Tensor]:
        dims, count = [0, *range(2, x.dim())], self.total * x[0, 0].numel()
        mean = self.stats[i][0]
        return x.sum(dims) / count, ((x - mean.view(_channels(x))) ** 2).sum(dims) / count


def share_pullback(x: Tensor, mean: Tensor, adjoint: tuple[Tensor, Tensor], total: int) -> Tensor:
    """The vjp of a chunk's share of a layer's statistics (see SplitBatch) w.r.t. the chunk `x`, of a batch of `total`
    examples: a1 / M + 2 a2 (x - mean) / M, a per-channel affine map of x. For a layer that normalises a block's
    input itself, one op instead of a vjp through the share's four ops (ResNet-12's support products in chunks of 3
    took 10% less time, docs/benchmarks.md)."""
    a1, a2 = adjoint
    count = total * x[0, 0].numel()
    scale = (2 / count) * a2
    return torch.addcmul((a1 / count - scale * mean).view(_channels(x)), x, scale.view(_channels(x)))


def run_split(f: Callable[..., Any], split: SplitBatch, *args: Any) -> Any:
    """f(*args) for one chunk, its norm layers as `split` says: f's output, or the stopping layer's record."""
    with split_batch(split):
        try:
            return f(*args)
        except StopPass as stop:
            return stop.record


def batch_statistics(
    run: Callable[[Any, SplitBatch], Any], chunks: list, total: int
) -> tuple[list[tuple[Tensor, Tensor]], Any, list[int | None]]:
    """Every norm layer's batch (mean, biased var), in call order, for a batch of `total` examples passed as `chunks`
    by `run(chunk, split)` (`run_split` of a model or block): one pass over the chunks per layer, since a layer's
    statistics need the earlier layers' (the chunks normalise with them on the way); differentiable. Also the first
    chunk's output (the pass that finds no norm layer left has gone through), and per layer which element of a chunk
    (a tensor or tuple) it normalises unchanged, if any (`Sums.reads`)."""
    stats: list[tuple[Tensor, Tensor]] = []
    reads: list[int | None] = []
    while True:
        sums = None
        for chunk in chunks:
            inputs = chunk if isinstance(chunk, tuple) else (chunk,)
            record = run(chunk, SplitBatch(stats, total, stop_at=len(stats), inputs=inputs))
            if not isinstance(record, Sums):
                return stats, record, reads
            sums = record if sums is None else sums + record
        assert sums is not None
        stats.append(sums.statistics())
        reads.append(sums.reads)


@contextlib.contextmanager
def split_batch(split: SplitBatch) -> Iterator[SplitBatch]:
    token = _SPLIT.set(split)
    try:
        yield split
    finally:
        _SPLIT.reset(token)
