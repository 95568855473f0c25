"""Reptile (Nichol et al. 2018): adapt to a task with plain SGD, then move the initialisation towards the adapted
weights. Its per-task update direction, theta - phi_task, is handed to the outer optimiser as the 'gradient', so
outer SGD with lr eps gives the paper's theta <- theta + eps * mean(phi_task - theta)."""

from __future__ import annotations

import torch
from torch import Tensor

from metascale.algorithms.base import MetaAlgorithm, Params, TaskOutput, register, task_loss, task_metrics
from metascale.algorithms.inner import gradient_descent
from metascale.data.tasks import Task


@register
class Reptile(MetaAlgorithm):
    name = "reptile"
    differentiable = False

    def _adapt(self, meta_params: Params, task: Task, steps: int | None) -> Params:
        with torch.no_grad():
            return gradient_descent(
                lambda p: task_loss(self.f(p, task.support_x), task.support_y),
                meta_params,
                steps=self.spec.inner.steps if steps is None else steps,
                lr=self.spec.inner.lr,
                first_order=True,
            )

    def _score(self, fast: Params, task: Task) -> tuple[Tensor, dict[str, Tensor]]:
        out = self.f(fast, task.query_x)
        loss = task_loss(out, task.query_y)
        return loss, task_metrics(out, task.query_y, loss)

    def task_objective(self, meta_params: Params, task: Task, steps: int | None = None) -> TaskOutput:
        with torch.no_grad():
            loss, metrics = self._score(self._adapt(meta_params, task, steps), task)
        return TaskOutput(loss, metrics)

    def task_update(self, meta_params: Params, task: Task) -> tuple[Params, dict[str, Tensor]]:
        fast = self._adapt(meta_params, task, None)
        with torch.no_grad():
            _, metrics = self._score(fast, task)
            return {k: meta_params[k].detach() - fast[k] for k in meta_params}, metrics
