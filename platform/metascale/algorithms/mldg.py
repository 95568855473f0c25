"""MLDG (Li et al. 2018, "Learning to Generalize: Meta-Learning for Domain Generalization", AAAI): train one model
over several source domains so that a step that lowers the loss on some of them (meta-train) also lowers it on the
others (meta-test), as a stand-in for the unseen target domain.

Per task (one step's data, data/domains.py: support = the meta-train domains' examples, query = the meta-test
domains') the objective is L_tr(theta) + beta * L_te(theta - alpha * grad L_tr(theta)), alpha = `inner.lr`,
beta = `mldg.beta`, differentiated through the virtual step (second order; `inner.first_order` drops the step's
second derivatives). Like Meta-Weight-Net, a many-shot job: the model's weights are trained by the outer optimiser.
'erm_pooled' is the baseline: the same model, steps and examples, the plain loss over all source domains pooled.
"""

from __future__ import annotations

import torch
from torch import Tensor

from metascale.algorithms.base import Functional, MetaAlgorithm, Params, TaskOutput, register, task_loss, task_metrics
from metascale.data.tasks import Task


def mldg_objective(
    f: Functional, theta: Params, task: Task, alpha: float, beta: float, first_order: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """(L_tr + beta * L_te(theta'), L_tr, the meta-test logits at theta'); theta must require grad."""
    train = task_loss(f(theta, task.support_x), task.support_y)
    names = list(theta)
    grads = torch.autograd.grad(  # retain: L_tr itself is part of the objective, backpropagated next
        train, [theta[k] for k in names], create_graph=not first_order, retain_graph=True, allow_unused=True
    )
    fast = {k: theta[k] - alpha * (torch.zeros_like(theta[k]) if g is None else g) for k, g in zip(names, grads)}
    out = f(fast, task.query_x)
    return train + beta * task_loss(out, task.query_y), train, out


def held_out(f: Functional, theta: Params, task: Task) -> TaskOutput:
    """Evaluation: the trained model itself on the query (held-out domain images); no adaptation."""
    out = f(theta, task.query_x)
    loss = task_loss(out, task.query_y)
    return TaskOutput(loss, task_metrics(out, task.query_y, loss))


@register
class MLDG(MetaAlgorithm):
    name = "mldg"

    def task_objective(self, meta_params: Params, task: Task, steps: int | None = None) -> TaskOutput:
        if not torch.is_grad_enabled():
            return held_out(self.f, meta_params, task)
        inner = self.spec.inner
        objective, train, out = mldg_objective(
            self.f, meta_params, task, inner.lr, self.spec.mldg.beta, inner.first_order
        )
        metrics = task_metrics(out, task.query_y, objective)
        return TaskOutput(objective, {**metrics, "train_loss": train.detach()})


@register
class PooledERM(MetaAlgorithm):
    """The baseline for 'mldg': plain training on every source example of the step (support and query pooled)."""

    name = "erm_pooled"

    def task_objective(self, meta_params: Params, task: Task, steps: int | None = None) -> TaskOutput:
        if not torch.is_grad_enabled():
            return held_out(self.f, meta_params, task)
        x, y = torch.cat([task.support_x, task.query_x]), torch.cat([task.support_y, task.query_y])
        out = self.f(meta_params, x)
        loss = task_loss(out, y)
        return TaskOutput(loss, {**task_metrics(out, y, loss), "train_loss": loss.detach()})
