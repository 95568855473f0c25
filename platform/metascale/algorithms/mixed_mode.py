"""Mixed-mode exact second-order meta-gradients (`inner.differentiation: mixed`), after MixFlow-MG (Kemaev et al.,
ICML 2025): the inner loop keeps no graph, and the backward pass is an explicit reverse sweep over its steps.

The inner step is phi_{k+1} = phi_k - lr * g_k, g_k = grad_phi L_s(phi_k; h), with `h` what the support loss
meta-learns besides the weights (learned_hparams' weight decays, learned_loss' loss network) and `lr` a float or
tensors (Meta-SGD's per-weight rates, learned_hparams' per-layer rates). Given v = dL/dphi_{k+1}, with u = lr * v:

    dL/dphi_k = v - H_phiphi(phi_k) u,    dL/dh -= H_hphi(phi_k) u,    dL/dlr -= g_k * v

and all three come from one forward-over-reverse product: `torch.func.jvp` of `torch.func.grad` of L_s w.r.t.
(phi, h) along the tangent (u, 0) gives g_k as its primal and (H_phiphi u, H_hphi u) as its tangent. What is kept
between the passes is phi_0, phi_s, phi_2s, ... (every `stride`-th step's weights; all K with stride 1) instead of
every step's double-backward graph; the sweep recomputes the s-1 steps after a kept one with plain gradients (the
same ops, so the same bits) and then goes back through them, so it holds at most s-1 more copies at a time. With
`inner.mixed_blocks` (the default), where the model has blocks, gradients and products run block by block
(block_products.py: the block boundaries and one block's forward-over-reverse at a time, for one more forward per
block); otherwise over the whole model (one `jvp` of `grad`, holding the whole model's activations and their
tangents). With `inner.support_chunk` both run over that many support examples at a time and are summed (_Support
says when that is exact). Per-task batch norm is differentiated through its batch statistics exactly as reverse mode
does (the same ops; inside `vmap`, models/norm.py's basic-op form).

The sweep is the backward of an `autograd.Function`, so whatever consumes phi_K (the plain, block-checkpointed or
chunked query pass) feeds it v as usual, and `generate_vmap_rule` lets the vmap executor batch it over tasks.
Intermediate parameters are returned as (non-differentiable) outputs because torch.func only lets a Function save
its inputs and outputs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from metascale.algorithms.base import Params
from metascale.algorithms.block_products import (
    SupportLoss,
    chunk_sizes,
    grad_and_product,
    has_batch_norm,
    split_at_blocks,
)
from metascale.models.checkpointing import plain_blocks


def mixed_descent(
    loss_fn: SupportLoss,
    params: Params,
    hparams: Params,
    x: Tensor,
    y: Tensor,
    *,
    steps: int,
    lr: float | Params,
    stride: int = 1,
    support_chunk: int | None = None,
    blocks: bool = True,
) -> Params:
    """`steps` steps p <- p - lr * dL_s/dp from `params`, differentiable w.r.t. `params`, `hparams` and tensor
    rates `lr` (one per key of `params`) through the reverse sweep above, keeping every `stride`-th step's weights;
    gradients and products over `support_chunk` support examples at a time, and one model block at a time if
    `blocks` (see _Support)."""
    names, hnames = list(params), list(hparams)
    rates = [lr[k] for k in names] if isinstance(lr, dict) else []
    outputs = _MixedDescent.apply(
        loss_fn,
        names,
        hnames,
        steps,
        stride,
        support_chunk,
        blocks,
        None if rates else lr,
        x,
        y,
        *(params[k] for k in names),
        *rates,
        *(hparams[k] for k in hnames),
    )
    return dict(zip(names, outputs[: len(names)]))


class _Support:
    """The support loss's gradient and products: with `blocks`, block by block where the model has blocks
    (block_products.py), else over the whole model (one `jvp` of `grad`, its blocks run plainly even where the model
    or a runtime asks for activation checkpointing, which torch.func refuses); with `chunk`, over that many support
    examples at a time.

    Chunks are exact where the support loss is a mean over independent examples plus terms that do not read the data
    (learned_hparams' decay): L = sum_c (n_c / n) L_c, so the gradient and every product are the chunks' weighted
    sums (the same numbers up to summation order), while a product holds one chunk's block boundaries and
    forward-over-reverse instead of the whole support set's. Where per-task batch norm in the blocks couples the
    examples (Conv-4, ResNet-12), the loss stays whole and each block runs in chunks instead (norm_chunks.py), of
    `chunk` examples where the maps are largest and more where they are smaller (block_products.chunk_sizes)."""

    def __init__(
        self, loss_fn: SupportLoss, x: Tensor, y: Tensor, phi: Params, h: Params, chunk: int | None, blocks: bool
    ):
        n = x.shape[0]
        size = min(chunk or n, n)
        split = split_at_blocks(loss_fn, phi, h, x[:size], y[:size]) if blocks or size < n else None
        # with batch norm in the blocks, each block runs in chunks with its statistics explicit (norm_chunks.py): block
        # by block whatever `blocks` says, since whole-model chunks would split the statistics (the config refuses it);
        # `size` where the maps are largest, more where they are smaller (chunk_sizes)
        coupled = size < n and split is not None and has_batch_norm(split)
        self.block_chunks = chunk_sizes(split, loss_fn, phi, h, x, y, size) if coupled else None
        self.split = split if blocks or coupled else None
        self.parts = [(x[i : i + size], y[i : i + size], _weighted(loss_fn, (min(i + size, n) - i) / n))
                      for i in range(0, n, size)] if size < n and not coupled else [(x, y, loss_fn)]  # fmt: skip

    def grad(self, phi: Params, h: Params) -> Params:
        total: Params = {}
        for x, y, loss_fn in self.parts:
            if self.split is None:
                with plain_blocks():
                    g = torch.func.grad(lambda p, hh: loss_fn(p, hh, x, y), argnums=(0, 1))(phi, h)[0]
            else:
                g = grad_and_product(self.split, loss_fn, phi, h, x, y, None, chunks=self.block_chunks)[0]
                assert g is not None
            _accumulate(total, g)
        return total

    def product(self, phi: Params, h: Params, u: Params, with_grad: bool) -> tuple[Params, Params, Params]:
        """(dL/dphi, H_phiphi u, H_hphi u); dL/dphi left empty unless `with_grad` (only tensor rates read it)."""
        g_all: Params = {}
        hu_all: Params = {}
        hhu_all: Params = {}
        for x, y, loss_fn in self.parts:
            if self.split is None:
                zeros = {k: torch.zeros_like(t) for k, t in h.items()}
                whole = torch.func.grad(lambda p, hh: loss_fn(p, hh, x, y), argnums=(0, 1))
                with plain_blocks():
                    (g, _), (hu, hhu) = torch.func.jvp(whole, (phi, h), (u, zeros))
            else:
                g, _, hu, hhu = grad_and_product(
                    self.split, loss_fn, phi, h, x, y, u, with_grad, chunks=self.block_chunks
                )
                assert hu is not None and hhu is not None
            if with_grad:
                assert g is not None
                _accumulate(g_all, g)
            _accumulate(hu_all, hu)
            _accumulate(hhu_all, hhu)
            del g, hu, hhu
        return g_all, hu_all, hhu_all


def _weighted(loss_fn: SupportLoss, weight: float) -> SupportLoss:
    """A chunk's share of the support loss: its mean over the chunk times the chunk's fraction of the examples."""
    return lambda p, h, x, y: loss_fn(p, h, x, y) * weight


def _accumulate(total: Params, more: Params) -> None:
    """total += more, key by key, emptying `more` as it goes (one key's sum at a time besides the two); not in place:
    under vmap a total may be unbatched where a later chunk's term is not."""
    for k in list(more):
        t = more.pop(k)
        total[k] = t if k not in total else total[k] + t


def _update(phi: Params, g: Params, rates: Params | None, lr: float | None) -> Params:
    """One inner step; the forward loop and the sweep's recomputation share it so that both give the same bits."""
    return {k: p - (rates[k] if rates is not None else lr) * g[k] for k, p in phi.items()}


def _minus(acc: Params, k: str, t: Tensor, alpha: float = 1.0) -> None:
    """acc[k] -= alpha * t, in place (the first time, acc[k] = -alpha * t: batched like `t` under vmap)."""
    acc[k] = t.mul(-alpha) if k not in acc else acc[k].sub_(t, alpha=alpha)


class _MixedDescent(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(loss_fn, names, hnames, steps, stride, chunk, blocks, lr, x, y, *tensors):
        n = len(names)
        phi = dict(zip(names, tensors[:n]))
        rates = dict(zip(names, tensors[n : 2 * n])) if lr is None else None
        h = dict(zip(hnames, tensors[len(tensors) - len(hnames) :]))
        support = _Support(loss_fn, x, y, phi, h, chunk, blocks)
        kept: list[Tensor] = []  # phi_s, phi_2s, ... below K (phi_0 is an input)
        for step in range(steps):
            if step and step % stride == 0:
                kept += [phi[k] for k in names]
            phi = _update(phi, support.grad(phi, h), rates, lr)
        return (*(phi[k] for k in names), *kept)

    @staticmethod
    def setup_context(ctx, inputs, output):
        loss_fn, names, hnames, steps, stride, chunk, blocks, lr, x, y, *tensors = inputs
        n = len(names)
        ctx.loss_fn, ctx.names, ctx.hnames, ctx.steps, ctx.stride, ctx.lr = loss_fn, names, hnames, steps, stride, lr
        ctx.chunk, ctx.blocks = chunk, blocks
        ctx.n_rates = n if lr is None else 0
        ctx.mark_non_differentiable(*output[n:])
        # no zero-filled gradients for the kept outputs (that many weight copies more at the backward's start)
        ctx.set_materialize_grads(False)
        # x, y, rates, h, then phi_0 (the inputs) and the kept phi_s, phi_2s, ...
        ctx.save_for_backward(x, y, *tensors[n:], *tensors[:n], *output[n:])

    @staticmethod
    def backward(ctx, *grad_outputs):
        names, hnames, n, stride, lr = ctx.names, ctx.hnames, len(ctx.names), ctx.stride, ctx.lr
        x, y, *saved = ctx.saved_tensors
        rates = dict(zip(names, saved[: ctx.n_rates])) if ctx.n_rates else None
        h = dict(zip(hnames, saved[ctx.n_rates : ctx.n_rates + len(hnames)]))
        kept = saved[ctx.n_rates + len(hnames) :]
        support = _Support(ctx.loss_fn, x, y, dict(zip(names, kept[:n])), h, ctx.chunk, ctx.blocks)
        v = {k: torch.zeros_like(kept[i]) if g is None else g for i, (k, g) in enumerate(zip(names, grad_outputs))}
        del grad_outputs
        # with a float rate the product runs along v itself and is scaled after (no W-sized u)
        scale = 1.0 if rates is not None else float(lr)
        d_rates: Params = {}
        d_h: Params = {}
        own_v = False  # v is the incoming gradient until the first step replaces it; then it is updated in place
        for first in reversed(range(0, ctx.steps, stride)):
            stretch = [dict(zip(names, kept[first // stride * n : (first // stride + 1) * n]))]
            for _ in range(first + 1, min(first + stride, ctx.steps)):
                stretch.append(_update(stretch[-1], support.grad(stretch[-1], h), rates, lr))
            while stretch:
                phi = stretch.pop()
                u = v if rates is None else {k: rates[k] * v[k] for k in names}
                g, hu, hhu = support.product(phi, h, u, rates is not None)
                del phi, u
                if rates is not None:
                    for k in names:
                        _minus(d_rates, k, (g[k] * v[k]).sum_to_size(rates[k].shape))
                del g
                for k in hnames:
                    _minus(d_h, k, hhu[k], scale)
                for k in names:
                    v[k] = v[k].sub_(hu[k], alpha=scale) if own_v else v[k] - scale * hu[k]
                own_v = True
                del hu, hhu
        return (
            *(None,) * 10,
            *(v[k] for k in names),
            *((d_rates[k] for k in names) if rates is not None else ()),
            *(d_h[k] for k in hnames),
        )
