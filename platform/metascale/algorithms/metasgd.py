"""Meta-SGD (Li et al. 2017): MAML that also meta-learns a learning rate for every weight (same shape as it)."""

from __future__ import annotations

import torch

from metascale.algorithms.base import Params, register
from metascale.algorithms.maml import MAML

PREFIX = "lr."


@register
class MetaSGD(MAML):
    name = "metasgd"

    def init(self, model_params: Params) -> Params:
        lr0 = self.spec.metasgd_init_lr or self.spec.inner.lr
        return {**model_params, **{PREFIX + k: torch.full_like(v, lr0) for k, v in model_params.items()}}

    def model_params(self, meta_params: Params) -> Params:
        return {k: v for k, v in meta_params.items() if not k.startswith(PREFIX)}

    def inner_lr(self, meta_params: Params) -> Params:
        return {k.removeprefix(PREFIX): v for k, v in meta_params.items() if k.startswith(PREFIX)}
