"""Prototypical Networks (Snell et al. 2017): meta-learn an embedding; classify a query by its squared Euclidean
distance to each class's mean support embedding (the prototype). No inner loop: `steps` is ignored."""

from __future__ import annotations

import torch
from torch import Tensor

from metascale.algorithms.base import MetaAlgorithm, Params, TaskOutput, one_hot, register, task_loss, task_metrics
from metascale.data.tasks import Task


def prototype_logits(support: Tensor, support_y: Tensor, query: Tensor, ways: int) -> Tensor:
    """-||q - c_k||^2 for every query q and class mean c_k (one-hot averaging: no data-dependent shapes, so vmap works).
    `ways` is the most classes an episode can have: a class absent from the support set (a variable-way episode with
    fewer) gets logit -inf, so it takes no probability and no gradient."""
    onehot = one_hot(support_y, ways, support.dtype)  # [S, N]
    counts = onehot.sum(0)
    protos = (onehot.T @ support) / counts.clamp(min=1).unsqueeze(1)  # [N, D]
    logits = -((query.unsqueeze(1) - protos.unsqueeze(0)) ** 2).sum(-1)
    return torch.where(counts > 0, logits, torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device))


@register
class ProtoNet(MetaAlgorithm):
    name = "protonet"

    def task_objective(self, meta_params: Params, task: Task, steps: int | None = None) -> TaskOutput:
        ways = self.f.model.head.out_features
        support = self.f(meta_params, task.support_x, embed=True)
        query = self.f(meta_params, task.query_x, embed=True)
        logits = prototype_logits(support, task.support_y, query, ways)
        loss = task_loss(logits, task.query_y)
        return TaskOutput(loss, task_metrics(logits, task.query_y, loss))
