"""LITE (Bronskill et al., NeurIPS 2021): forward the whole support set, back-propagate through a random subset.

The subset's outputs carry their gradient scaled by N/H and the rest carry none, while every output keeps its
value: `out = s * o + (1 - s) * o.detach()` on the subset. For a loss that sums per-example terms the gradient
estimate is then unbiased: each example is in the subset with probability H/N and its gradient is scaled by N/H.
Memory: only the H subset rows keep activations for the backward pass; the rest are forwarded under no_grad.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def lite_subset(n: int, h: int, generator: torch.Generator) -> Tensor:
    """A boolean mask over n examples with exactly h True, uniformly over the subsets of size h."""
    if not 0 < h <= n:
        raise ValueError(f"support_backprop_subset must be in 1..{n} (got {h})")
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=generator)[:h]] = True
    return mask


def lite_outputs(forward: Callable[[Tensor], Tensor], x: Tensor, mask: Tensor, scale: float) -> Tensor:
    """forward(x) for every row; rows where `mask` carry the gradient times `scale`, the others none.

    Both parts are always forwarded (possibly with zero rows) so that every rank of a ZeRO-3 group runs the same
    sequence of forward calls (each gathers parameters collectively), whatever its share of the subset."""
    idx, rest = mask.nonzero().squeeze(1), (~mask).nonzero().squeeze(1)
    kept = forward(x[idx])
    kept = scale * kept + (1.0 - scale) * kept.detach()
    with torch.no_grad():
        dropped = forward(x[rest])
    out = kept.new_empty((x.shape[0], *kept.shape[1:]))
    out[idx], out[rest] = kept, dropped.to(kept.dtype)
    return out
