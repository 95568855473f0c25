"""MAML (Finn et al. 2017): meta-learn an initialisation by differentiating through the inner loop.
First-order MAML drops the inner loop's second derivatives (the inner gradients are treated as constants)."""

from __future__ import annotations

from torch import Tensor

from metascale.algorithms.base import MetaAlgorithm, Params, TaskOutput, register, task_loss, task_metrics
from metascale.algorithms.inner import adapt
from metascale.algorithms.query_chunks import query_pass
from metascale.data.tasks import Task


@register
class MAML(MetaAlgorithm):
    name = "maml"
    first_order = False

    def inner_lr(self, meta_params: Params) -> float | Params:
        return self.spec.inner.lr

    def support_loss(self, meta_params: Params, out: Tensor, y: Tensor) -> Tensor:
        """What the inner loop minimises (the task loss; a learned loss overrides it)."""
        return task_loss(out, y)

    def support_hparams(self, meta_params: Params) -> Params:
        """The meta-parameters `support_loss` reads (none here; a learned loss's network)."""
        return {}

    def task_objective(self, meta_params: Params, task: Task, steps: int | None = None) -> TaskOutput:
        inner = self.spec.inner
        fast = adapt(
            lambda p, h, x, y: self.support_loss(h, self.f(p, x), y),
            self.model_params(meta_params),
            self.support_hparams(meta_params),
            task.support_x,
            task.support_y,
            steps=inner.steps if steps is None else steps,
            lr=self.inner_lr(meta_params),
            first_order=self.first_order or inner.first_order,
            inner=inner,
        )
        loss, out = query_pass(self.f, fast, task, inner)
        return TaskOutput(loss, task_metrics(out, task.query_y, loss))


@register
class FOMAML(MAML):
    name = "fomaml"
    first_order = True
