"""ResNet-12 (Oreshkin et al. 2018; Lee et al. 2019): four residual stages of three 3x3 convs, 2x2 max-pool each."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from metascale.config import ResNet12Spec
from metascale.models.checkpointing import run_blocks
from metascale.models.norm import TaskBatchNorm


class ResidualStage(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False), TaskBatchNorm(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False), TaskBatchNorm(cout)
        self.conv3, self.bn3 = nn.Conv2d(cout, cout, 3, padding=1, bias=False), TaskBatchNorm(cout)
        self.shortcut, self.bn_sc = nn.Conv2d(cin, cout, 1, bias=False), TaskBatchNorm(cout)

    def forward(self, x: Tensor) -> Tensor:
        h = F.leaky_relu(self.bn1(self.conv1(x)), 0.1)
        h = F.leaky_relu(self.bn2(self.conv2(h)), 0.1)
        h = self.bn3(self.conv3(h))
        return F.max_pool2d(F.leaky_relu(h + self.bn_sc(self.shortcut(x)), 0.1), 2)


class ResNet12(nn.Module):
    def __init__(self, spec: ResNet12Spec, out_features: int):
        super().__init__()
        widths = [spec.in_channels, *spec.channels]
        self.stages = nn.Sequential(*(ResidualStage(a, b) for a, b in zip(widths, widths[1:])))
        self.feature_dim = widths[-1]
        self.head = nn.Linear(self.feature_dim, out_features)
        self.checkpoint_blocks = False  # activation checkpointing per residual stage (set by the sharded runtime)

    def forward(self, x: Tensor, embed: bool = False) -> Tensor:
        h = run_blocks(self.stages, x, self.checkpoint_blocks).mean(dim=(2, 3))
        return h if embed else self.head(h)
