"""Mixed mode's support gradients and Hessian-vector products one model block at a time (MixFlow-MG's block-level
recomputation). Written by hand: `torch.func.grad` refuses saved-tensor hooks, so torch.utils.checkpoint cannot run
inside it.

The support loss L(phi, h) is split where the model hands its blocks to `run_blocks` (models/checkpointing.py, the
one place that knows the blocks: ResNet-12's stages in three parts, the ViT's attention and MLP halves, Conv-4's
conv-norm-ReLU(-pool) layers):

    x_0 = S(phi_out, h)            the stem: what the model runs before its blocks (the input itself for CNNs)
    x_{l+1} = f_l(theta_l, x_l)    block l, reading only its own weights theta_l
    L = T(phi, h, x_L)             the rest: what follows the blocks, the loss, and any term on the weights
                                   themselves (learned_hparams' decay), so T reads all of phi

Product along u (a tangent for every weight; none for h): the forward pass runs one `jvp` per block but the last
and keeps only the block boundaries x_l with their tangents xdot_l. Then `jvp` of `grad` of the last block and the
tail together, T(phi, h, f_{L-1}(theta_{L-1}, x_{L-1})), gives their gradients, the cotangent c_{L-1} and their
tangents (so the last block's forward runs once, not once for its boundary and again inside its backward); from the
block below it down, `jvp` of the block's `vjp` at (theta_l, x_l, c_{l+1}) along (u_l, xdot_l, cdot_{l+1}) gives the
block's gradient g_l, its tangent (H u)_l, and the cotangent c_l with its tangent for the block below; the stem's
`vjp` (if the stem is not the input) likewise. The sums are exactly dL/dphi, dL/dh, H_phiphi u and H_hphi u, while a
product holds the boundaries and one block's forward-over-reverse instead of the whole model's.
Without a tangent the same pass is a plain gradient that holds the boundaries and one block's backward.
A boundary may be a tuple of tensors (ResNet-12's first two parts of a stage hand on the stage's input for its
shortcut): torch.func takes tuples as primals, tangents and cotangents alike.

A model that never calls `run_blocks` (the MLP, a custom backbone), or whose blocks read weights that are not in phi
or share them, has no split: `split_at_blocks` returns None and mixed mode takes the whole-model product.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from metascale.algorithms.base import Params
from metascale.algorithms.norm_chunks import block_op, per_example, scaled_chunks
from metascale.models.checkpointing import blocks_replaced
from metascale.models.norm import TaskBatchNorm

# L_s(phi, h, x, y): the support loss of weights phi and hyperparameters h on the support set (x, y). The data is an
# argument, not captured, so that under vmap it arrives batched through mixed mode's Function's inputs.
SupportLoss = Callable[[Params, Params, Tensor, Tensor], Tensor]


class _AtBlocks(Exception):
    """Ends the support loss's forward pass where the model reaches its blocks."""

    def __init__(self, blocks: list[nn.Module], h: Tensor):
        super().__init__()
        self.blocks, self.h = blocks, h
        # read here, while functional_call has the blocks' parameters substituted (phi's tensors) and the model's
        # autocast (algorithms/base.py `Functional`) is still on: both end with the model's forward
        self.params = [dict(b.named_parameters()) for b in blocks]
        self.buffers = [dict(b.named_buffers()) for b in blocks]
        device = h.device.type
        self.autocast = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))


@dataclass(frozen=True)
class Block:
    module: nn.Module
    keys: dict[str, str]  # the module's parameter name -> its key in phi
    buffers: dict[str, Tensor]


@dataclass(frozen=True)
class Split:
    blocks: list[Block]
    outside: list[str]  # phi's keys in no block (stem and tail)
    stem_is_input: bool
    autocast: tuple[str, torch.dtype, bool]  # what the model ran its blocks under


def _stem(loss_fn: SupportLoss, phi: Params, h: Params, x: Tensor, y: Tensor) -> _AtBlocks | None:
    def stop(blocks: list[nn.Module], h0: Tensor) -> Tensor:
        raise _AtBlocks(blocks, h0)

    with blocks_replaced(stop):
        try:
            loss_fn(phi, h, x, y)
        except _AtBlocks as at:
            return at
    return None


def split_at_blocks(loss_fn: SupportLoss, phi: Params, h: Params, x: Tensor, y: Tensor) -> Split | None:
    """The support loss's blocks, found by running its stem once (None: no usable split)."""
    with torch.no_grad():
        at = _stem(loss_fn, phi, h, x, y)
    if at is None or not at.blocks:
        return None
    key_of = {id(v): k for k, v in phi.items()}
    blocks, taken = [], set()
    for module, params, buffers in zip(at.blocks, at.params, at.buffers):
        keys = {name: key_of.get(id(p)) for name, p in params.items()}
        if None in keys.values() or taken & set(keys.values()):
            return None
        taken |= set(keys.values())
        blocks.append(Block(module, keys, buffers))  # type: ignore[arg-type]
    return Split(blocks, [k for k in phi if k not in taken], at.h is x, at.autocast)


def stem_output(loss_fn: SupportLoss, phi: Params, h: Params, x: Tensor, y: Tensor) -> Tensor:
    """What the loss's stem hands its blocks, for a loss `split_at_blocks` split."""
    at = _stem(loss_fn, phi, h, x, y)
    assert at is not None  # split_at_blocks found the blocks on this very loss
    return at.h


def has_batch_norm(split: Split) -> bool:
    """Whether the blocks hold per-task batch norm, which couples a task's examples through its statistics."""
    return any(isinstance(m, TaskBatchNorm) for b in split.blocks for m in b.module.modules())


def chunk_sizes(
    split: Split, loss_fn: SupportLoss, phi: Params, h: Params, x: Tensor, y: Tensor, chunk: int
) -> list[int | None]:
    """How many examples each block but the last runs at a time under batch norm (None: all of them): `chunk` where a
    block's boundaries (its input or its output, per example) are largest, proportionally more where they are smaller
    (norm_chunks.scaled_chunks). Sizes come from the blocks run on two examples (batch norm needs more than one value
    per channel)."""
    with torch.no_grad():
        b = x[:2] if split.stem_is_input else stem_output(loss_fn, phi, h, x[:2], y[:2])
        sizes = []
        for block in split.blocks[:-1]:
            out = block_fn(split, block)({k: phi[k] for k in block.keys.values()}, b)
            sizes.append(max(per_example(b), per_example(out)))
            b = out
    return scaled_chunks(sizes, chunk, len(x))


def block_fn(split: Split, block: Block) -> Callable[[Params, Tensor], Tensor]:
    device, dtype, enabled = split.autocast

    def f(theta: Params, x: Tensor) -> Tensor:
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            state = {name: theta[k] for name, k in block.keys.items()}
            return torch.func.functional_call(block.module, {**state, **block.buffers}, (x,))

    return f


def _pullback(f: Callable) -> Callable:
    """(primals..., cotangent) -> the vjp of `f` at the primals: a block's backward, recomputing its forward."""
    return lambda *args: torch.func.vjp(f, *args[:-1])[1](args[-1])


def _push(f: Callable, primals: tuple, tangents: tuple | None):
    """f(*primals) and, with tangents, its jvp along them (None without)."""
    if tangents is None:
        return f(*primals), None
    return torch.func.jvp(f, primals, tangents)


def _add(into: Params, more: Params) -> None:
    for k, t in more.items():
        into[k] = into[k] + t  # not in place: under vmap `into[k]` may be unbatched where `t` is not


def grad_and_product(
    split: Split,
    loss_fn: SupportLoss,
    phi: Params,
    h: Params,
    x: Tensor,
    y: Tensor,
    u: Params | None,
    need_grad: bool = True,
    chunks: list[int | None] | None = None,
) -> tuple[Params | None, Params, Params | None, Params | None]:
    """(dL/dphi, dL/dh, H_phiphi u, H_hphi u) block by block; the last two None when `u` is None, the first None
    unless `need_grad` (a product computes the gradient anyway, but only tensor rates read it: not summing the
    blocks' parts into it saves a sum per block). With `chunks` (one per block but the last, `chunk_sizes`), each
    block with a size runs that many examples at a time with its batch statistics explicit (norm_chunks.py); the
    last, at the smallest maps, and the tail run whole."""
    zh = {k: torch.zeros_like(t) for k, t in h.items()} if u is not None else None
    out = split.outside

    def part(keys: Iterable[str], d: Params | None) -> Params | None:
        return None if d is None else {k: d[k] for k in keys}

    def stem(rest: Params, hh: Params) -> Tensor:
        return stem_output(loss_fn, {**phi, **rest}, hh, x, y)

    def tail(p: Params, hh: Params, x_last: Tensor) -> Tensor:
        with blocks_replaced(lambda blocks, h0: x_last):
            return loss_fn(p, hh, x, y)

    if split.stem_is_input:
        xl, xd = x, (None if u is None else torch.zeros_like(x))
    else:
        xl, xd = _push(stem, (part(out, phi), h), None if u is None else (part(out, u), zh))
    # the last block runs inside the tail's gradient: its forward is not run a second time to find a boundary
    *blocks, last = split.blocks
    fns, f_last = [block_fn(split, b) for b in blocks], block_fn(split, last)
    sizes = chunks or [None] * len(fns)
    ops = [block_op(f, len(x), c) for f, c in zip(fns, sizes)]
    bounds = []  # each block's input and tangent, and what its forward kept for its backward (with tangents)
    for block, op in zip(blocks, ops):
        theta_u = None if u is None else (part(block.keys.values(), u), xd)
        (x_next, kept), dots = _push(op.forward, (part(block.keys.values(), phi), xl), theta_u)
        bounds.append((xl, xd, kept, None if dots is None else dots[1]))
        xl, xd = x_next, None if dots is None else dots[0]
        del x_next, kept, dots

    def last_and_tail(p: Params, hh: Params, x_in: Tensor) -> Tensor:
        return tail(p, hh, f_last(part(last.keys.values(), p), x_in))

    tail_grad = torch.func.grad(last_and_tail, argnums=(0, 1, 2))
    (g, gh, c), dots = _push(tail_grad, (phi, h, xl), None if u is None else (u, zh, xd))
    hu, hhu, cd = dots if dots is not None else (None, None, None)
    del xl, xd
    for block, op in zip(reversed(blocks), reversed(ops)):
        xl, xd, kept, kd = bounds.pop()
        keys = list(block.keys.values())
        tangents = None if u is None else (part(keys, u), xd, kd, cd)
        (g_l, c), dots = _push(op.pullback, (part(keys, phi), xl, kept, c), tangents)
        if need_grad:
            _add(g, g_l)
        if dots is not None:
            _add(hu, dots[0])
            cd = dots[1]
        del xl, xd, kept, kd, g_l, dots
    if not split.stem_is_input:
        tangents = None if u is None else (part(out, u), zh, cd)
        (g_s, gh_s), dots = _push(_pullback(stem), (part(out, phi), h, c), tangents)
        if need_grad:
            _add(g, g_s)
        _add(gh, gh_s)
        if dots is not None:
            _add(hu, dots[0])
            _add(hhu, dots[1])
    return (g if need_grad else None), gh, hu, hhu
