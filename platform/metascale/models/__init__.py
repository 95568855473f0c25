"""Models by name. Every model maps x -> logits (or regression outputs), has `forward(x, embed=True)` for the
features before its classifier, and names that classifier `head` (ANIL adapts only `head.*`). `custom` is a user's own
backbone by import path (custom.py); any model can start from a file (`model.init_from`, init_from.py)."""

from __future__ import annotations

from typing import Callable

from torch import nn

from metascale.config import ModelSpec
from metascale.models.conv4 import Conv4
from metascale.models.custom import Custom
from metascale.models.darts import DartsNet
from metascale.models.mlp import MLP
from metascale.models.resnet12 import ResNet12
from metascale.models.vit import ViT

MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "conv4": Conv4,
    "resnet12": ResNet12,
    "vit": ViT,
    "custom": Custom,
    "darts": DartsNet,
}


def build_model(spec: ModelSpec, out_features: int) -> nn.Module:
    return MODELS[spec.name](spec, out_features)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
