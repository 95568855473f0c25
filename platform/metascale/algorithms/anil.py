"""ANIL (Raghu et al. 2020): 'almost no inner loop': adapt only the classifier head; the body is meta-learned
through the head's adaptation. The body's features are computed once per task, not once per inner step."""

from __future__ import annotations

from torch.utils.checkpoint import checkpoint as recompute

from metascale.algorithms.base import MetaAlgorithm, Params, TaskOutput, register, task_loss, task_metrics
from metascale.algorithms.inner import gradient_descent
from metascale.data.tasks import Task


@register
class ANIL(MetaAlgorithm):
    name = "anil"

    def task_objective(self, meta_params: Params, task: Task, steps: int | None = None) -> TaskOutput:
        inner, prefix = self.spec.inner, self.spec.head_prefix
        support = self.f(meta_params, task.support_x, embed=True)
        head = {k: v for k, v in meta_params.items() if k.startswith(prefix)}
        fast = gradient_descent(
            lambda h: task_loss(self.f.head(h, support), task.support_y),
            head,
            steps=inner.steps if steps is None else steps,
            lr=inner.lr,
            first_order=inner.first_order,
            checkpoint=inner.checkpoint != "none",
        )

        def query(h: Params):
            out = self.f.head(h, self.f(meta_params, task.query_x, embed=True))
            return task_loss(out, task.query_y), out

        loss, out = recompute(query, fast, use_reentrant=False) if inner.checkpoint == "all" else query(fast)
        return TaskOutput(loss, task_metrics(out, task.query_y, loss))
