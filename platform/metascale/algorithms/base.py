"""What every meta-learning algorithm is: pure functions over parameter dicts, with no Ray or DeepSpeed inside.

An algorithm owns two things: which meta-parameters it learns (`init`: the model's weights, plus e.g. Meta-SGD's
learning rates) and what one task contributes to the meta-gradient (`task_objective`, differentiated by autograd;
or `task_update` directly for algorithms such as Reptile whose update is not the gradient of a loss).
Distribution, batching over tasks (vmap or a loop) and sharding wrap these from outside (`executor.py`, cluster/).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metascale.algorithms.calibration import expected_calibration_error
from metascale.config import AlgorithmSpec
from metascale.data.tasks import Task

Params = dict[str, Tensor]


class Functional:
    """A module in functional form: `f(params, x)` with its buffers held fixed; optional bf16 autocast."""

    def __init__(self, model: nn.Module, bf16: bool = False):
        self.model = model
        self.buffers = dict(model.named_buffers())
        self.bf16 = bf16

    def __call__(self, params: Params, x: Tensor, embed: bool = False) -> Tensor:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = torch.func.functional_call(self.model, {**params, **self.buffers}, (x,), {"embed": embed})
        return out.float() if self.bf16 else out

    def head(self, params: Params, features: Tensor) -> Tensor:
        """The classifier alone, on features from `embed=True` (params keyed 'head.*')."""
        head = {k.removeprefix("head."): v for k, v in params.items() if k.startswith("head.")}
        return torch.func.functional_call(self.model.head, head, (features,))


def task_loss(out: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy for integer labels (classification), mean squared error otherwise (regression).

    The squared error is written out: forward-over-reverse through `F.mse_loss` (mixed mode's Hessian-vector
    products) fails in torch 2.13 ("ZeroTensors are immutable")."""
    if y.dtype in (torch.int64, torch.int32):
        return F.cross_entropy(out, y)
    return ((out - y) ** 2).mean()


def one_hot(y: Tensor, classes: int, dtype: torch.dtype) -> Tensor:
    """`F.one_hot` as a comparison: `F.one_hot` checks its labels' range with `.item()`, which `vmap` refuses once
    a `grad` transform is inside it (the vmap executor's second-order path)."""
    return (y.unsqueeze(-1) == torch.arange(classes, device=y.device)).to(dtype)


def task_metrics(out: Tensor, y: Tensor, loss: Tensor) -> dict[str, Tensor]:
    m = {"loss": loss.detach()}
    if y.dtype in (torch.int64, torch.int32):
        m["accuracy"] = (out.detach().argmax(-1) == y).float().mean()
        probs = torch.softmax(out.detach().float(), -1)  # out: logits/log-probs
        m["ece"] = expected_calibration_error(probs, y)
        m["confidence"] = probs.max(-1).values.mean()  # above accuracy: over-confident; below: under-confident
    return m


@dataclass(frozen=True)
class TaskOutput:
    objective: Tensor  # the task's meta-loss, differentiable w.r.t. the meta-parameters
    metrics: dict[str, Tensor]  # detached, post-adaptation query metrics


class MetaAlgorithm:
    """Base class; subclasses set `name` and override `task_objective` (or `task_update`)."""

    name: ClassVar[str]
    # True when the meta-gradient comes from autograd through `task_objective`; False for direct updates (Reptile).
    differentiable: ClassVar[bool] = True

    def __init__(self, spec: AlgorithmSpec, model: nn.Module, data: Any = None):
        self.spec = spec
        # The job's data section: read by algorithms that act in the tasks themselves (maml_rl's environment).
        self.data = data
        self.f = Functional(model, bf16=spec.inner.autocast == "bf16")

    def init(self, model_params: Params) -> Params:
        """The meta-parameters, from the model's initial weights."""
        return dict(model_params)

    def model_params(self, meta_params: Params) -> Params:
        """The part of the meta-parameters that are model weights (what a checkpoint user loads into the model)."""
        return dict(meta_params)

    def task_objective(self, meta_params: Params, task: Task, steps: int | None = None) -> TaskOutput:
        """Adapt on the support set (`steps` overrides the inner steps, e.g. at test time), score on the query set."""
        raise NotImplementedError

    def task_update(self, meta_params: Params, task: Task) -> tuple[Params, dict[str, Tensor]]:
        """A direct meta-update direction for one task (only for non-differentiable algorithms)."""
        raise NotImplementedError


ALGORITHMS: dict[str, type[MetaAlgorithm]] = {}


def register(cls: type[MetaAlgorithm]) -> type[MetaAlgorithm]:
    ALGORITHMS[cls.name] = cls
    return cls
