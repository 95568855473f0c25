"""Learned inner-loop hyperparameters: a learning rate and a weight decay per layer, meta-learned by hypergradient
(differentiating the query loss through the unrolled inner loop, as in MAML) along with the initialisation.

Inner step of a layer l: p <- p - lr_l * (dL_s/dp + wd_l * p), i.e. gradient descent on L_s + sum_l wd_l/2 ||p_l||^2.
Layers are the model's modules (a weight and its bias share a rate). Unlike Meta-SGD's one rate per weight, this adds
2 scalars per layer: the hyperparameter meta-representation of the survey, between 'fixed' and 'per parameter'.
"""

from __future__ import annotations

import torch
from torch import Tensor

from metascale.algorithms.base import MetaAlgorithm, Params, TaskOutput, register, task_loss, task_metrics
from metascale.algorithms.inner import adapt
from metascale.algorithms.query_chunks import query_pass
from metascale.data.tasks import Task

LR, WD = "hparams.lr.", "hparams.wd."


def layer(name: str) -> str:
    return name.rsplit(".", 1)[0]


@register
class LearnedHparams(MetaAlgorithm):
    name = "learned_hparams"

    def init(self, model_params: Params) -> Params:
        ref = next(iter(model_params.values()))
        layers = sorted({layer(k) for k in model_params})
        lr, wd = self.spec.inner.lr, self.spec.learned.init_weight_decay
        return {
            **model_params,
            **{LR + n: torch.tensor(lr, dtype=ref.dtype, device=ref.device) for n in layers},
            **{WD + n: torch.tensor(wd, dtype=ref.dtype, device=ref.device) for n in layers},
        }

    def model_params(self, meta_params: Params) -> Params:
        return {k: v for k, v in meta_params.items() if not k.startswith("hparams.")}

    def task_objective(self, meta_params: Params, task: Task, steps: int | None = None) -> TaskOutput:
        inner = self.spec.inner
        weights = self.model_params(meta_params)
        lr = {k: meta_params[LR + layer(k)] for k in weights}
        decays = {k: v for k, v in meta_params.items() if k.startswith(WD)}

        def support(p: Params, wd: Params, x: Tensor, y: Tensor) -> Tensor:
            decay = sum(wd[WD + layer(k)] / 2 * (v**2).sum() for k, v in p.items())
            return task_loss(self.f(p, x), y) + decay

        fast = adapt(
            support,
            weights,
            decays,
            task.support_x,
            task.support_y,
            steps=inner.steps if steps is None else steps,
            lr=lr,
            first_order=inner.first_order,
            inner=inner,
        )
        loss, out = query_pass(self.f, fast, task, inner)
        return TaskOutput(loss, task_metrics(out, task.query_y, loss))
