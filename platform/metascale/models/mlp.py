"""The sinusoid MLP of the MAML paper: 1 -> 40 -> 40 -> 1 with ReLU."""

from __future__ import annotations

from torch import Tensor, nn

from metascale.config import MLPSpec


class MLP(nn.Module):
    def __init__(self, spec: MLPSpec, out_features: int):
        super().__init__()
        layers: list[nn.Module] = []
        width = spec.in_features
        for h in spec.hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, out_features)
        self.feature_dim = width

    def forward(self, x: Tensor, embed: bool = False) -> Tensor:
        h = self.body(x)
        return h if embed else self.head(h)
