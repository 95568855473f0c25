"""A model block (or several in a row) over a few examples at a time, exact under per-task batch norm: each block of
mixed mode's block-by-block support products (`inner.support_chunk` on Conv-4 and ResNet-12), and each segment of the
query pass in chunks (`inner.query_chunk`, query_chunks.py).

A block's norm layers read statistics of the block's own input (over the whole set), so its examples are
coupled only through them. With the statistics S = (mean, biased var) per norm layer given from outside
(models/norm.py `SplitBatch`), y_c = f(theta, x_c, S) reads one chunk. So a block runs as:

- forward: S as differentiable sums over chunks (layer by layer: a layer's statistics may need the earlier ones'),
  then the output chunk by chunk with S fixed. S is a few per-channel vectors; it is kept beside the boundary, so the
  backward does not collect it again.
- backward with cotangent c: per chunk, the vjp of f at (theta, x_c, S) gives the weights' gradient, the chunk's input
  cotangent and the statistics' adjoint a_S, all summed; then, from the last norm layer down, a_S is pushed through
  the statistics' definition, a sum over examples: the vjp of each chunk's share (sum x / M, sum (x - mean)^2 / M)
  adds to the weights, the chunk's input cotangent and the earlier layers' adjoints. A layer that normalises the
  block's input itself (ResNet-12's bn1 and bn2: its parts are cut before them) has no weights or layers before it,
  so its share's vjp is a per-channel affine map of each chunk (models/norm.py `share_pullback`), with no vjp run.
  The last layer that normalises something the block computed (ResNet-12's bn3) feeds no later layer's statistics,
  so its adjoint is taken first, by a vjp in its statistics alone (the block's forward, no convolution backward), and
  the main vjps take its share along with that adjoint as the cotangent: no vjp of its own, which would run its conv
  forward and backward again.

Holding the layer's own mean fixed inside its variance's share is exact, for the product too: d var / d mean =
-(2/M) sum (x - mean) is identically zero where mean is the batch mean, and so is its tangent. block_products.py takes
`torch.func.jvp` of both procedures along (u, xdot[, Sdot], cdot), as of the unchunked ones: forward mode keeps no
tape, so a product holds the whole support set's boundaries (the next block's statistics need every example) and
one chunk's forward-over-reverse instead of the support set's.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from torch import Tensor

from metascale.algorithms.base import Params
from metascale.models.norm import SplitBatch, batch_statistics, run_split, share_pullback

Boundary = Tensor | tuple[Tensor, ...]  # ResNet-12's stage parts hand on (stage input, maps)
Stats = list[tuple[Tensor, Tensor]]


def _chunks(x: Boundary, size: int) -> list:
    if isinstance(x, tuple):
        return list(zip(*(t.split(size) for t in x)))
    return list(x.split(size))


def _joined(outs: list, chunks: list, x: Boundary) -> Boundary:
    """The chunks' outputs as one; an output that is each chunk's own input (ResNet-12's stage input, handed on for
    the shortcut) is the whole input, not a copy: boundaries are kept for the whole set."""
    if not isinstance(outs[0], tuple):
        return torch.cat(outs)
    inputs = list(x) if isinstance(x, tuple) else [x]

    def one(j: int) -> Tensor:
        for i, whole in enumerate(inputs):
            if all(o[j] is (c[i] if isinstance(c, tuple) else c) for o, c in zip(outs, chunks)):
                return whole
        return torch.cat([o[j] for o in outs])

    return tuple(one(j) for j in range(len(outs[0])))


def _vjp(f: Callable, cotangent, *primals):
    """The vjp of f at `primals` for `cotangent`. The forward it holds is freed on return: kept in a loop's variable,
    it would live on through the next chunk's forward (support chunks of 4: 162.1 MB against 153.2 at 10 steps)."""
    return torch.func.vjp(f, *primals)[1](cotangent)


def _plus(a, b):
    """a + b for tensors and tuples, lists and dicts of them; None is zero."""
    if a is None:
        return b
    if isinstance(a, dict):
        return {k: _plus(t, b[k]) for k, t in a.items()}
    if isinstance(a, (tuple, list)):
        return type(a)(_plus(s, t) for s, t in zip(a, b))
    return a + b


class ChunkedBlock:
    """A block's forward and backward over `size` of a set's `total` examples at a time."""

    def __init__(self, f: Callable[[Params, Boundary], Boundary], total: int, size: int):
        self.f, self.total, self.size = f, total, size
        self.reads: list[int | None] = []  # per norm layer, the input element it normalises unchanged (forward's)

    def _run(self, theta: Params, x: Boundary, stats: Stats, stop_at: int | None = None):
        return run_split(self.f, SplitBatch(stats, self.total, stop_at), theta, x)

    def forward(self, theta: Params, x: Boundary) -> tuple[Boundary, Stats]:
        """(the block's output, its statistics: every norm layer's (mean, biased var), in call order, as differentiable
        sums over the chunks). The pass that finds the statistics complete gives the first chunk's output."""
        chunks = _chunks(x, self.size)
        stats, first, self.reads = batch_statistics(
            lambda xc, split: run_split(self.f, split, theta, xc), chunks, self.total
        )
        return _joined([first, *(self._run(theta, xc, stats) for xc in chunks[1:])], chunks, x), stats

    def pullback(self, theta: Params, x: Boundary, stats: Stats, c: Boundary) -> tuple[Params, Boundary]:
        """(dL/dtheta, dL/dx) for the cotangent `c` of the block's output, statistics included."""
        xs, cs = _chunks(x, self.size), _chunks(c, self.size)
        # the last layer that normalises something computed in the block (ResNet-12's bn3, a Conv-4 layer's norm):
        # nothing after it depends on its statistics, so their adjoint is known before the main vjps, which then take
        # its share along instead of a vjp of their own that would run the layer's conv forward and backward again
        folded = max((layer for layer, j in enumerate(self.reads) if j is None), default=None)
        a_folded = None if folded is None else self._direct_adjoint(theta, xs, stats, cs, folded)
        # the input's cotangent is summed into one whole-size tensor in place (not chunks and then a copy of them all:
        # with its tangent, at ResNet-12's first stage that copy would be the product's largest tensors)
        cx = tuple(torch.zeros_like(t) for t in x) if isinstance(x, tuple) else torch.zeros_like(x)
        g, a_stats = None, None
        for i, (xc, cc) in enumerate(zip(xs, cs)):
            if folded is None:
                g_c, cx_c, a_c = _vjp(self._run, cc, theta, xc, stats)
            else:
                g_c, cx_c, a_c = _vjp(partial(self._run_sharing, layer=folded), (cc, a_folded), theta, xc, stats)
            g, a_stats = _plus(g, g_c), _plus(a_stats, a_c)
            self._add_at(cx, i, cx_c)
            del cx_c
        for layer in reversed(range(len(stats))):
            j = self.reads[layer]
            if layer == folded:  # taken along in the vjps above
                continue
            if j is not None:  # the layer normalises the block's input: its share's vjp is a map of that input
                whole, into = (x[j], cx[j]) if isinstance(x, tuple) else (x, cx)
                # chunk by chunk into the cotangent's rows: a whole-size result (and tangent) would raise the peak
                for xc, rows in zip(whole.split(self.size), into.split(self.size)):
                    rows.add_(share_pullback(xc, stats[layer][0], a_stats[layer], self.total))
                continue

            def share(th: Params, xx: Boundary, earlier: Stats, layer: int = layer) -> tuple[Tensor, Tensor]:
                return self._run(th, xx, [*earlier, *stats[layer:]], stop_at=layer)

            for i, xc in enumerate(xs):
                g_c, cx_c, a_c = _vjp(share, tuple(a_stats[layer]), theta, xc, stats[:layer])
                g = _plus(g, g_c)
                self._add_at(cx, i, cx_c)
                a_stats[:layer] = _plus(a_stats[:layer], a_c)
        return g, cx

    def _run_sharing(self, theta: Params, x: Boundary, stats: Stats, layer: int) -> tuple[Boundary, tuple]:
        """(the chunk's output, its share of `layer`'s statistics), from one pass."""
        split = SplitBatch(stats, self.total, share_of=layer)
        return run_split(self.f, split, theta, x), split.share

    def _direct_adjoint(self, theta: Params, xs: list, stats: Stats, cs: list, layer: int) -> tuple[Tensor, Tensor]:
        """The adjoint of `layer`'s statistics as the output reads them, the others held: a vjp in those statistics
        alone, so the pass runs the block forward but no convolution backward."""
        total = None
        for xc, cc in zip(xs, cs):

            def run(s: tuple[Tensor, Tensor], xc: Boundary = xc) -> Boundary:
                return self._run(theta, xc, [*stats[:layer], s, *stats[layer + 1 :]])

            total = _plus(total, _vjp(run, cc, stats[layer])[0])
        return total

    def _add_at(self, total: Boundary, i: int, part: Boundary) -> None:
        """Adds chunk i's `part` into `total`'s rows, in place."""
        for t, p in zip(total, part) if isinstance(total, tuple) else [(total, part)]:
            t.narrow(0, i * self.size, p.shape[0]).add_(p)


def per_example(b: Boundary) -> int:
    """How many numbers a boundary holds per example."""
    return sum(t[0].numel() for t in (b if isinstance(b, tuple) else (b,)))


def scaled_chunks(largest: list[int], chunk: int, total: int) -> list[int | None]:
    """How many of `total` examples each block runs at a time (None: all at once), given per block the numbers per
    example of its largest boundary: `chunk` where that is largest, and proportionally more where it is smaller, so
    that no block's chunk holds more than the largest block's. A chunked block runs its statistics passes and their
    adjoints whatever its chunk, so small chunks where the maps are small cost time and lower no peak."""
    top = max(largest)
    return [c if c < total else None for c in (chunk * top // size for size in largest)]


def block_op(f: Callable[[Params, Boundary], Boundary], total: int, size: int | None) -> ChunkedBlock | WholeBlock:
    """Block `f` over `total` examples, `size` at a time (None: all at once, its norms the native ones)."""
    return WholeBlock(f) if size is None else ChunkedBlock(f, total, size)


class WholeBlock:
    """A block over the whole set at once: ChunkedBlock's interface, keeping nothing from forward to backward."""

    def __init__(self, f: Callable[[Params, Boundary], Boundary]):
        self.f = f

    def forward(self, theta: Params, x: Boundary) -> tuple[Boundary, tuple]:
        return self.f(theta, x), ()

    def pullback(self, theta: Params, x: Boundary, kept: tuple, c: Boundary) -> tuple[Params, Boundary]:
        return _vjp(self.f, c, theta, x)
