"""Meta-Weight-Net (Shu et al. 2019): a small net maps each training example's loss to its weight in the training
loss, meta-learned so that a one-step lookahead of the model on the weighted noisy loss does well on a small clean
meta set. A many-shot, single-task job: the model's weights are trained (not meta-learned as an initialisation) by
the outer optimiser, together with the weight net, one minibatch task per slot (data/noisy_labels.py).

Per task the objective is L_meta(theta'(psi)) + <w_psi(l)^, l(theta)>, with theta' = theta^ - a grad
<w_psi(l), l(theta^)> (^: held constant; <w, l> = sum_i w_i l_i / sum_i w_i). Its gradient is psi's lookahead
hypergradient for the weight net and the weighted training gradient for the model, so one backward gives both of
the paper's updates (the model's uses the
weights before, not after, this step's weight-net update: the simultaneous variant). 'erm' is the baseline: plain
training on the noisy labels, every weight 1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from metascale.algorithms.base import MetaAlgorithm, Params, TaskOutput, register, task_loss, task_metrics
from metascale.data.tasks import Task

PREFIX = "mwn."


def example_weights(meta_params: Params, losses: Tensor) -> Tensor:
    """w(l) = sigmoid(W2 relu(W1 l + b1) + b2): the paper's 1-hidden-layer net on each example's loss."""
    h = torch.relu(losses.unsqueeze(-1) @ meta_params[PREFIX + "w1"] + meta_params[PREFIX + "b1"])
    return torch.sigmoid(h @ meta_params[PREFIX + "w2"] + meta_params[PREFIX + "b2"]).squeeze(-1)


def weighted_mean(weights: Tensor, losses: Tensor) -> Tensor:
    """sum_i w_i l_i / sum_i w_i, as the authors' code does: only relative weights count, so the net cannot lower the
    meta loss by scaling every weight (a disguised learning-rate change) instead of telling examples apart."""
    return (weights * losses).sum() / weights.sum().clamp_min(1e-8)


@register
class MetaWeightNet(MetaAlgorithm):
    name = "mwn"

    def init(self, model_params: Params) -> Params:
        ref = next(iter(model_params.values()))
        kw, hidden = {"dtype": ref.dtype, "device": ref.device}, self.spec.mwn.hidden
        net = {
            "w1": torch.randn(1, hidden, **kw),
            "b1": torch.zeros(hidden, **kw),
            "w2": torch.randn(hidden, 1, **kw) / math.sqrt(hidden),
            "b2": torch.zeros(1, **kw),
        }
        return {**model_params, **{PREFIX + k: v for k, v in net.items()}}

    def model_params(self, meta_params: Params) -> Params:
        return {k: v for k, v in meta_params.items() if not k.startswith(PREFIX)}

    def task_objective(self, meta_params: Params, task: Task, steps: int | None = None) -> TaskOutput:
        theta = self.model_params(meta_params)
        if not torch.is_grad_enabled():  # evaluation: the trained model on the (clean) query examples
            out = self.f(theta, task.query_x)
            loss = task_loss(out, task.query_y)
            return TaskOutput(loss, task_metrics(out, task.query_y, loss))
        out = self.f(theta, task.support_x)
        losses = F.cross_entropy(out, task.support_y, reduction="none")
        train = weighted_mean(example_weights(meta_params, losses.detach()).detach(), losses)
        meta_loss, meta_out = self._lookahead(meta_params, theta, task)
        metrics = task_metrics(meta_out, task.query_y, meta_loss)
        metrics["train_loss"] = train.detach()
        return TaskOutput(meta_loss + train, metrics)

    def _lookahead(self, meta_params: Params, theta: Params, task: Task) -> tuple[Tensor, Tensor]:
        """The clean meta loss after one virtual SGD step on the weighted noisy loss: a function of psi only."""
        fixed = {k: v.detach().requires_grad_(True) for k, v in theta.items()}
        losses = F.cross_entropy(self.f(fixed, task.support_x), task.support_y, reduction="none")
        weighted = weighted_mean(example_weights(meta_params, losses.detach()), losses)
        names = list(fixed)
        grads = torch.autograd.grad(weighted, [fixed[k] for k in names], create_graph=True)
        fast = {k: fixed[k] - self.spec.inner.lr * g for k, g in zip(names, grads)}
        out = self.f(fast, task.query_x)
        return task_loss(out, task.query_y), out


@register
class PlainTraining(MetaWeightNet):
    """The baseline for 'mwn': the same model and data, trained on the noisy labels with every weight 1."""

    name = "erm"

    def init(self, model_params: Params) -> Params:
        return dict(model_params)

    def task_objective(self, meta_params: Params, task: Task, steps: int | None = None) -> TaskOutput:
        if not torch.is_grad_enabled():
            return super().task_objective(meta_params, task, steps)
        out = self.f(meta_params, task.support_x)
        loss = task_loss(out, task.support_y)
        return TaskOutput(loss, {**task_metrics(out, task.support_y, loss), "train_loss": loss.detach()})
