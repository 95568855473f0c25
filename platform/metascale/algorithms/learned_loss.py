"""A learned inner loss (after ML^3, Bechtle et al. 2021, and meta-critic losses): the inner loop minimises
  L_inner = mean_i [ l_i + g_psi(out_i, target_i, l_i) ]
where l_i is the example's task loss and g_psi a small tanh network over the example's outputs (logits), its target
(one-hot for classification) and l_i. psi is meta-learned through the inner loop (second order) with the
initialisation. g's last layer starts at zero, so training starts exactly as MAML and learns a correction to the loss.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from metascale.algorithms.base import Params, one_hot, register
from metascale.algorithms.maml import MAML

PREFIX = "loss_net."


def per_example(out: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """(the task loss of each example, the target as features): cross-entropy and one-hot, or squared error and y."""
    if y.dtype in (torch.int64, torch.int32):
        return F.cross_entropy(out, y, reduction="none"), one_hot(y, out.shape[-1], out.dtype)
    return ((out - y) ** 2).mean(-1), y


def loss_net(psi: Params, features: Tensor) -> Tensor:
    h = torch.tanh(features @ psi[PREFIX + "w1"] + psi[PREFIX + "b1"])
    return (h @ psi[PREFIX + "w2"] + psi[PREFIX + "b2"]).squeeze(-1)


@register
class LearnedLoss(MAML):
    name = "learned_loss"

    def init(self, model_params: Params) -> Params:
        ref = next(iter(model_params.values()))
        outputs, hidden = self.f.model.head.out_features, self.spec.learned.loss_hidden
        width = 2 * outputs + 1  # outputs, target features, the example's loss
        kw = {"dtype": ref.dtype, "device": ref.device}
        psi = {
            "w1": torch.randn(width, hidden, **kw) / math.sqrt(width),
            "b1": torch.zeros(hidden, **kw),
            "w2": torch.zeros(hidden, 1, **kw),
            "b2": torch.zeros(1, **kw),
        }
        return {**model_params, **{PREFIX + k: v for k, v in psi.items()}}

    def model_params(self, meta_params: Params) -> Params:
        return {k: v for k, v in meta_params.items() if not k.startswith(PREFIX)}

    def support_hparams(self, meta_params: Params) -> Params:
        return {k: v for k, v in meta_params.items() if k.startswith(PREFIX)}

    def support_loss(self, meta_params: Params, out: Tensor, y: Tensor) -> Tensor:
        psi = {k: v for k, v in meta_params.items() if k.startswith(PREFIX)}
        losses, target = per_example(out, y)
        return (losses + loss_net(psi, torch.cat([out, target, losses.unsqueeze(-1)], -1))).mean()
