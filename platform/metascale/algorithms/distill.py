"""Dataset distillation (Wang et al. 2018, "Dataset Distillation"): the meta-parameters are `images_per_class`
synthetic examples per class and the inner learning rate; a model freshly initialised for each task, trained
`inner.steps` full-batch gradient steps on the synthetic set, should do well on real data. The meta-gradient runs
back through those steps (second order) to every synthetic pixel and the learning rate (the paper's "random init"
setting, which distils images that train unseen initialisations).

Data: `data.source: noisy_labels` with `label_noise: 0` (a many-shot set of `ways` classes, data/noisy_labels.py). A
train task's real batch is its support (a training minibatch). Evaluation trains fresh models on the synthetic set
and scores the query (a slice of the held-out test set); beside it, the baseline: the same fresh model, trained the
same steps at `inner.lr` on as many random real images (`images_per_class` of each class from the task's support,
a sample of the clean meta set), reported as `baseline_loss` and `baseline_accuracy`.

Each task's initialisation is drawn from a generator seeded by the task's bytes, which are a pure function of (seed,
split, step, slot): a recomputed slot gets the same model. Matrices (conv kernels, linear weights) and their biases
are drawn as PyTorch's default layers draw them, U(-1/sqrt(fan_in), 1/sqrt(fan_in)); norm scales and shifts keep
the model's values.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import torch
from torch import Tensor

from metascale.algorithms.base import MetaAlgorithm, Params, TaskOutput, register, task_loss, task_metrics
from metascale.algorithms.inner import gradient_descent
from metascale.data.tasks import Task

PREFIX = "distill."
IMAGES, LOG_LR = PREFIX + "images", PREFIX + "log_lr"


def task_seed(task: Task) -> int:
    """A 32-bit seed from the task's contents (a pure function of its (seed, split, step, slot))."""
    seed = 0
    for t in (task.support_x, task.support_y, task.query_x, task.query_y):
        seed = zlib.crc32(np.ascontiguousarray(t.detach().cpu().numpy()).tobytes(), seed)
    return seed


def fresh_init(template: Params, seed: int) -> Params:
    """A new initialisation shaped like `template` (see the module's docstring), from `seed` alone."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, p in template.items():
        w = template.get(k.removesuffix("bias") + "weight") if k.endswith("bias") else p
        if w is None or w.dim() < 2:
            out[k] = p.detach().clone()
            continue
        bound = 1 / math.sqrt(w[0].numel())
        out[k] = ((torch.rand(p.shape, generator=gen, dtype=torch.float64) * 2 - 1) * bound).to(p.dtype)
    return out


@register
class Distill(MetaAlgorithm):
    name = "distill"

    def init(self, model_params: Params) -> Params:
        ref = next(iter(model_params.values()))
        d, ways = self.spec.distill, self.f.model.head.out_features
        gen = torch.Generator().manual_seed(0x44)
        images = torch.randn(ways * d.images_per_class, *d.shape, generator=gen, dtype=torch.float64)
        lr = torch.tensor(math.log(d.init_lr), dtype=torch.float64)
        return {IMAGES: images.to(ref.dtype), LOG_LR: lr.to(ref.dtype)}

    def model_params(self, meta_params: Params) -> Params:
        return {}  # every task trains a fresh model: no weights are meta-learned

    def labels(self) -> Tensor:
        return torch.arange(self.f.model.head.out_features).repeat_interleave(self.spec.distill.images_per_class)

    def train_fresh(self, theta: Params, x: Tensor, y: Tensor, lr: Tensor | float, steps: int) -> Params:
        return gradient_descent(
            lambda p: task_loss(self.f(p, x), y), theta, steps=steps, lr=lr, first_order=self.spec.inner.first_order
        )

    def task_objective(self, meta_params: Params, task: Task, steps: int | None = None) -> TaskOutput:
        images = meta_params[IMAGES]
        template = {k: v.to(images.dtype) for k, v in self.f.model.named_parameters()}
        theta = fresh_init(template, task_seed(task))
        steps = self.spec.inner.steps if steps is None else steps
        lr = meta_params[LOG_LR].exp()
        fast = self.train_fresh(theta, images, self.labels().to(images.device), lr, steps)
        training = torch.is_grad_enabled()
        x, y = (task.support_x, task.support_y) if training else (task.query_x, task.query_y)
        out = self.f(fast, x)
        loss = task_loss(out, y)
        metrics = {**task_metrics(out, y, loss), "inner_lr": lr.detach()}
        if not training:
            metrics.update(self._baseline(theta, task, steps))
        return TaskOutput(loss, metrics)

    def _baseline(self, theta: Params, task: Task, steps: int) -> dict[str, Tensor]:
        """The same fresh model trained on `images_per_class` real images of each class (the first of each class in
        the task's support) at `inner.lr`, scored on the same query."""
        k, y = self.spec.distill.images_per_class, task.support_y
        rows = torch.cat([torch.nonzero(y == c).flatten()[:k] for c in range(self.f.model.head.out_features)])
        fast = self.train_fresh(theta, task.support_x[rows], y[rows], self.spec.inner.lr, steps)
        out = self.f(fast, task.query_x)
        loss = task_loss(out, task.query_y)
        return {"baseline_" + name: v for name, v in task_metrics(out, task.query_y, loss).items()}
