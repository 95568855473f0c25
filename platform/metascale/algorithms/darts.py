"""Architecture search as a meta-representation: DARTS cells (models/darts.py) meta-learned with an initialisation,
as in T-NAS (Lian et al. 2020) and MetaNAS (Elsken et al. 2020), the architecture weights learned on the query split.

Meta-parameters: the network's weights w (a MAML-style initialisation) and the architecture weights alpha. Per task
tau, with support and query losses S_tau, Q_tau of the network at (weights, alpha):

    w'_tau = w - lr * grad_w S_tau(w, alpha)      (inner.steps such steps; alpha fixed: only weights adapt)
    objective = mean_tau Q_tau(w'_tau, alpha)

alpha and w both get the query-split gradient of that objective; alpha is never updated on the support split.
`inner.first_order: true` (the jobs' setting, first-order DARTS) treats the inner gradients as constants, so the
meta-gradients are grad_w Q_tau and grad_alpha Q_tau at (w'_tau, alpha): dw'/dw = I and dw'/dalpha = 0, DARTS'
first-order approximation applied to a meta-learned initialisation (FOMAML for w). With `first_order: false` both
are exact through the unrolled inner loop (second-order DARTS / MAML). `algorithm.darts.learn_alpha: false` holds
alpha at its uniform start (no meta-gradient): the same network and cost with a fixed architecture, the baseline.
"""

from __future__ import annotations

from torch import Tensor

from metascale.algorithms.base import MetaAlgorithm, Params, TaskOutput, register, task_loss, task_metrics
from metascale.algorithms.inner import adapt
from metascale.algorithms.query_chunks import query_pass
from metascale.data.tasks import Task
from metascale.models.darts import ALPHA


def split(meta_params: Params) -> tuple[Params, Params]:
    """(network weights, architecture weights)."""
    weights = {k: v for k, v in meta_params.items() if k != ALPHA}
    return weights, {ALPHA: meta_params[ALPHA]}


@register
class DARTS(MetaAlgorithm):
    name = "darts"

    def task_objective(self, meta_params: Params, task: Task, steps: int | None = None) -> TaskOutput:
        inner = self.spec.inner
        weights, arch = split(meta_params)
        if not self.spec.darts.learn_alpha:
            arch = {k: v.detach() for k, v in arch.items()}

        def support(p: Params, a: Params, x: Tensor, y: Tensor) -> Tensor:
            return task_loss(self.f({**p, **a}, x), y)

        fast = adapt(
            support,
            weights,
            arch,
            task.support_x,
            task.support_y,
            steps=inner.steps if steps is None else steps,
            lr=inner.lr,
            first_order=inner.first_order,
            inner=inner,
        )
        loss, out = query_pass(self.f, {**fast, **arch}, task, inner)
        return TaskOutput(loss, task_metrics(out, task.query_y, loss))
