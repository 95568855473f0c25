"""iMAML (Rajeswaran et al. 2019): meta-gradients through the inner problem's optimality condition, not its path.

The inner problem is proximally regularised: phi*(theta) = argmin L_s(phi) + reg/2 ||phi - theta||^2. At the
optimum, d phi*/d theta = (I + H/reg)^-1 with H the Hessian of L_s at phi*, so the meta-gradient is
v = (I + H/reg)^-1 grad L_q(phi*), solved by conjugate gradient with Hessian-vector products (torch.func.vjp of
torch.func.grad, linearised once per task and reused by every CG step). The inner loop runs with no graph, so memory does not grow with its steps;
the price is that v is exact only when the inner loop has (nearly) reached phi*.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from metascale.algorithms.base import MetaAlgorithm, Params, TaskOutput, register, task_loss, task_metrics
from metascale.algorithms.inner import gradient_descent
from metascale.data.tasks import Task


def conjugate_gradient(matvec: Callable[[Params], Params], b: Params, steps: int) -> Params:
    """Solves A x = b for symmetric positive definite A given as `matvec`, from x = 0, in `steps` iterations."""
    x = {k: torch.zeros_like(v) for k, v in b.items()}
    r = {k: v.clone() for k, v in b.items()}
    p = {k: v.clone() for k, v in b.items()}
    rr = _dot(r, r)
    for _ in range(steps):
        if rr <= 1e-30:
            break
        ap = matvec(p)
        alpha = rr / _dot(p, ap)
        x = {k: x[k] + alpha * p[k] for k in x}
        r = {k: r[k] - alpha * ap[k] for k in r}
        rr_new = _dot(r, r)
        p = {k: r[k] + (rr_new / rr) * p[k] for k in p}
        rr = rr_new
    return x


def _dot(a: Params, b: Params) -> Tensor:
    return sum((a[k] * b[k]).sum() for k in a)


@register
class IMAML(MetaAlgorithm):
    name = "imaml"
    differentiable = False  # the meta-gradient is solved for, not backpropagated: see task_update

    def _support_loss(self, task: Task) -> Callable[[Params], Tensor]:
        return lambda p: task_loss(self.f(p, task.support_x), task.support_y)

    def _adapt(self, meta_params: Params, task: Task, steps: int | None) -> Params:
        reg = self.spec.imaml.reg
        theta = {k: v.detach() for k, v in meta_params.items()}
        support = self._support_loss(task)

        def proximal(p: Params) -> Tensor:
            return support(p) + reg / 2 * sum(((p[k] - theta[k]) ** 2).sum() for k in p)

        with torch.no_grad():  # no graph of the inner path: memory independent of the inner steps
            return gradient_descent(
                proximal, theta, steps=self.spec.inner.steps if steps is None else steps, lr=self.spec.inner.lr
            )

    def task_objective(self, meta_params: Params, task: Task, steps: int | None = None) -> TaskOutput:
        fast = self._adapt(meta_params, task, steps)
        with torch.no_grad():
            out = self.f(fast, task.query_x)
            loss = task_loss(out, task.query_y)
        return TaskOutput(loss, task_metrics(out, task.query_y, loss))

    def task_update(self, meta_params: Params, task: Task) -> tuple[Params, dict[str, Tensor]]:
        fast = self._adapt(meta_params, task, None)
        with torch.enable_grad():
            leaves = {k: v.detach().requires_grad_(True) for k, v in fast.items()}
            out = self.f(leaves, task.query_x)
            loss = task_loss(out, task.query_y)
            names = list(leaves)
            g = dict(zip(names, torch.autograd.grad(loss, [leaves[k] for k in names], allow_unused=True)))
        g = {k: torch.zeros_like(fast[k]) if v is None else v for k, v in g.items()}
        reg = self.spec.imaml.reg
        _, hvp = torch.func.vjp(torch.func.grad(self._support_loss(task)), fast)  # H v = vjp(v): H is symmetric

        def matvec(v: Params) -> Params:
            (hv,) = hvp(v)
            return {k: v[k] + hv[k] / reg for k in v}

        return conjugate_gradient(matvec, g, self.spec.imaml.cg_steps), task_metrics(out, task.query_y, loss.detach())
