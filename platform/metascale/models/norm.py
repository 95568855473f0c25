"""Per-task batch normalisation, as in the MAML paper: statistics from the current batch only, no running stats.

`nn.BatchNorm2d`'s native kernel gives wrong second-order gradients under `vmap(grad(...))` (FIELD-NOTES; relative
error 0.8-18% in float64), so inside vmap the norm is written out in basic ops, which agree to ~1e-13. Outside vmap
the native kernel is correct and faster. The executor marks vmapped code with `batched_tasks()`, which also tells the
inner loop to take its gradients with `torch.func.grad`.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_BATCHED = contextvars.ContextVar("metascale_tasks_batched", default=False)


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
        if not tasks_batched():
            return F.batch_norm(x, None, None, self.weight, self.bias, training=True, eps=self.eps)
        dims = [0, *range(2, x.dim())]
        mean = x.mean(dim=dims, keepdim=True)
        var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
        shape = [1, -1] + [1] * (x.dim() - 2)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight.view(shape) + self.bias.view(shape)
