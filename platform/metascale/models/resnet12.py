"""ResNet-12 (Oreshkin et al. 2018; Lee et al. 2019): four residual stages of three 3x3 convs, 2x2 max-pool each."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from metascale.config import ResNet12Spec
from metascale.models.checkpointing import run_blocks
from metascale.models.norm import TaskBatchNorm


class ResidualStage(nn.Module):
    """conv-norm-ReLU twice, conv-norm, plus a 1x1 conv-norm shortcut, ReLU, pool; run as three `parts`, one conv
    each: the units `run_blocks` checkpoints and mixed mode differentiates one at a time, so that a product holds one
    part's forward-over-reverse, not the whole stage's (at 84x84 the first stage's full-resolution maps dominate).

    The parts are cut before a norm, not after it: conv1 | bn1-ReLU-conv2 | bn2-ReLU-conv3-bn3 + shortcut-bn_sc,
    ReLU, pool. A part's first norm then reads the part's own input, so where a part runs in support chunks with its
    batch statistics explicit (algorithms/norm_chunks.py) those statistics need no conv run again, and the shortcut's
    norm comes before bn3, after only the 1x1 shortcut conv. The boundaries are the same size either way, but the last
    part now also holds bn2's and its ReLU's maps: a whole-support-set product peaks higher (docs/benchmarks.md, the
    84x84 ResNet-12 row: unchunked mixed mode 0.521 -> 0.640 of reverse's peak). The first two parts hand on (stage
    input, maps) so that the last can add the shortcut. The parts hold the stage's own layers but are not registered
    under it, so the parameters keep one name each (stages.i.conv1.weight)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False), TaskBatchNorm(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False), TaskBatchNorm(cout)
        self.conv3, self.bn3 = nn.Conv2d(cout, cout, 3, padding=1, bias=False), TaskBatchNorm(cout)
        self.shortcut, self.bn_sc = nn.Conv2d(cin, cout, 1, bias=False), TaskBatchNorm(cout)
        parts = (
            _Enter(self.conv1),
            _Middle(self.bn1, self.conv2),
            _Exit(self.bn2, self.conv3, self.bn3, self.shortcut, self.bn_sc),
        )
        object.__setattr__(self, "parts", parts)

    def forward(self, x: Tensor) -> Tensor:
        return self.parts[2](self.parts[1](self.parts[0](x)))


class _Enter(nn.Module):
    def __init__(self, conv: nn.Module):
        super().__init__()
        self.conv = conv

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x, self.conv(x)


class _Middle(nn.Module):
    def __init__(self, bn: nn.Module, conv: nn.Module):
        super().__init__()
        self.bn, self.conv = bn, conv

    def forward(self, xc: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        x, c = xc
        return x, self.conv(F.leaky_relu(self.bn(c), 0.1))


class _Exit(nn.Module):
    def __init__(self, bn: nn.Module, conv: nn.Module, bn_out: nn.Module, shortcut: nn.Module, bn_sc: nn.Module):
        super().__init__()
        self.bn, self.conv, self.bn_out, self.shortcut, self.bn_sc = bn, conv, bn_out, shortcut, bn_sc

    def forward(self, xc: tuple[Tensor, Tensor]) -> Tensor:
        x, c = xc
        h = F.leaky_relu(self.bn(c), 0.1)
        sc = self.bn_sc(self.shortcut(x))  # before bn_out, whose statistics need the conv: see ResidualStage
        return F.max_pool2d(F.leaky_relu(self.bn_out(self.conv(h)) + sc, 0.1), 2)


class ResNet12(nn.Module):
    def __init__(self, spec: ResNet12Spec, out_features: int):
        super().__init__()
        widths = [spec.in_channels, *spec.channels]
        self.stages = nn.Sequential(*(ResidualStage(a, b) for a, b in zip(widths, widths[1:])))
        self.feature_dim = widths[-1]
        self.head = nn.Linear(self.feature_dim, out_features)
        self.checkpoint_blocks = False  # activation checkpointing per stage part (set by the sharded runtime)

    def forward(self, x: Tensor, embed: bool = False) -> Tensor:
        parts = [part for stage in self.stages for part in stage.parts]
        h = run_blocks(parts, x, self.checkpoint_blocks).mean(dim=(2, 3))
        return h if embed else self.head(h)
