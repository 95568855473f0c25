"""iMAML (Rajeswaran et al. 2019): meta-gradients through the inner problem's optimality condition, not its path.

The inner problem is proximally regularised: phi*(theta) = argmin L_s(phi) + reg/2 ||phi - theta||^2. At the
optimum, d phi*/d theta = (I + H/reg)^-1 with H the Hessian of L_s at phi*, so the meta-gradient is
v = (I + H/reg)^-1 grad L_q(phi*), solved by conjugate gradient with Hessian-vector products (torch.func.vjp of
torch.func.grad, linearised once per task and reused by every CG step), H damped by `imaml.damping`. The inner
loop runs with no graph, so memory does not grow with its steps; the price is that v is exact only when the inner
loop has (nearly) reached phi*, where I + H/reg is positive definite; short of it, it may not be.

Why the damping (Levenberg-Marquardt: (I + (H + damping I)/reg) v = grad L_q): without it, I + H/reg is indefinite
on the glyph set (smallest eigenvalue -0.6 at the init, -4 to -7 after training: 16 inner steps do not reach a
minimum) and CG's 5th iterate reached 166x the query gradient's norm. The default 22 is the reference code's system
(aravindr93/imaml_dev solves (2I + H/12) v = g with reg 2) up to scale.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from metascale.algorithms.base import MetaAlgorithm, Params, TaskOutput, register, task_loss, task_metrics
from metascale.algorithms.inner import gradient_descent
from metascale.data.tasks import Task


def conjugate_gradient(matvec: Callable[[Params], Params], b: Params, steps: int) -> Params:
    """Solves A x = b for symmetric positive definite A given as `matvec`, from x = 0, in `steps` iterations.

    Stops at the first search direction p with p.Ap <= 0 (A is not positive definite: an inner loop short of its
    minimum), keeping the iterate so far, or b itself if that is the first: dividing by p.Ap flips or blows it up.
    """
    x = {k: torch.zeros_like(v) for k, v in b.items()}
    r = {k: v.clone() for k, v in b.items()}
    p = {k: v.clone() for k, v in b.items()}
    rr = _dot(r, r)
    for i in range(steps):
        if rr <= 1e-30:
            break
        ap = matvec(p)
        curvature = _dot(p, ap)
        if curvature <= 0:
            return x if i else {k: v.clone() for k, v in b.items()}
        alpha = rr / curvature
        x = {k: x[k] + alpha * p[k] for k in x}
        r = {k: r[k] - alpha * ap[k] for k in r}
        rr_new = _dot(r, r)
        p = {k: r[k] + (rr_new / rr) * p[k] for k in p}
        rr = rr_new
    return x


def line_search_descent(loss_fn: Callable[[Params], Tensor], params: Params, *, steps: int, lr: float) -> Params:
    """`steps` gradient steps, each the longest of lr * 2^-j that decreases the loss by at least half the linear
    prediction (Armijo backtracking); the next step starts from twice the step taken.

    Why: a fixed step cannot suit every task and every point of meta-training (the support Hessian's top eigenvalue
    moves by an order of magnitude), and iMAML's meta-gradient is only right at the inner minimum.
    """
    for _ in range(steps):
        grads, loss = torch.func.grad_and_value(loss_fn)(params)
        slope = float(_dot(grads, grads))
        while True:
            trial = {k: params[k] - lr * grads[k] for k in params}
            if float(loss_fn(trial)) <= float(loss) - 0.5 * lr * slope or lr < 1e-6:
                break
            lr /= 2
        params, lr = trial, 2 * lr
    return params


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

        steps = self.spec.inner.steps if steps is None else steps
        with torch.no_grad():  # no graph of the inner path: memory independent of the inner steps
            if self.spec.imaml.solver == "line_search":
                return line_search_descent(proximal, theta, steps=steps, lr=self.spec.inner.lr)
            return gradient_descent(proximal, theta, steps=steps, lr=self.spec.inner.lr)

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
        reg, damping = self.spec.imaml.reg, self.spec.imaml.damping
        _, hvp = torch.func.vjp(torch.func.grad(self._support_loss(task)), fast)  # H v = vjp(v): H is symmetric

        def matvec(v: Params) -> Params:
            (hv,) = hvp(v)
            return {k: v[k] + (hv[k] + damping * v[k]) / reg for k in v}

        return conjugate_gradient(matvec, g, self.spec.imaml.cg_steps), task_metrics(out, task.query_y, loss.detach())
