"""Conv-4 of the MAML paper (after Vinyals et al.): four 3x3 conv -> per-task batch norm -> ReLU blocks.

'omniglot': 64 filters, stride-2 convolutions, features averaged over space (MAML's Omniglot model).
'miniimagenet': 32 filters (set `hidden`), 2x2 max-pooling after each block, features flattened.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from metascale.config import Conv4Spec
from metascale.models.checkpointing import run_blocks
from metascale.models.norm import TaskBatchNorm


class Conv4(nn.Module):
    def __init__(self, spec: Conv4Spec, out_features: int):
        super().__init__()
        self.pool = spec.variant == "miniimagenet"
        stride = 1 if self.pool else 2
        blocks: list[nn.Module] = []
        channels, size = spec.in_channels, spec.image_size
        for _ in range(4):
            blocks += [
                nn.Conv2d(channels, spec.hidden, 3, stride=stride, padding=1),
                TaskBatchNorm(spec.hidden),
                nn.ReLU(),
            ]
            if self.pool:
                blocks.append(nn.MaxPool2d(2))
            size = size // 2 if self.pool else (size + 1) // 2
            channels = spec.hidden
        self.body = nn.Sequential(*blocks)
        self.block_len = 4 if self.pool else 3  # conv, norm, ReLU (, pool): the unit of activation checkpointing
        self.checkpoint_blocks = False
        self.feature_dim = spec.hidden * size * size if self.pool else spec.hidden
        self.head = nn.Linear(self.feature_dim, out_features)

    def forward(self, x: Tensor, embed: bool = False) -> Tensor:
        n = self.block_len
        h = run_blocks((self.body[i : i + n] for i in range(0, len(self.body), n)), x, self.checkpoint_blocks)
        h = torch.flatten(h, 1) if self.pool else h.mean(dim=(2, 3))
        return h if embed else self.head(h)
