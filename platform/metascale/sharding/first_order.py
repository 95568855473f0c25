"""First-order meta-learning (FOMAML, Reptile, first-order ANIL) with the inner loop run by a DeepSpeed engine, at
any ZeRO stage.

Tasks run one after another; each task's examples are split over the ranks (data parallel within the task), so the
engine's gradient averaging gives the whole-task gradient. Per task:
  reset   copy the published meta-parameters (cut to this rank's layout on arrival) into the engine's partitions;
  adapt   `inner.steps` SGD steps through the engine (engine.backward + engine.step, SGD at the inner lr);
  direct  FOMAML: one more backward on the query loss, whose reduce-scattered gradient partition is this rank's share
          of the task's meta-gradient; Reptile: meta - adapted, partition by partition.
The directions of the item's finite tasks are summed partition-wise and go back to the coordinator, which owns the
meta-optimiser; under ZeRO-3 no rank ever holds the whole model.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from metascale.algorithms.executor import MetaGradient
from metascale.cluster.messages import NumpyParams
from metascale.config import JobSpec
from metascale.data.tasks import Task
from metascale.sharding.engine import (
    Params,
    build_engine,
    is_partitioned,
    local_grads,
    local_params,
    partition_of,
    set_local_params,
)
from metascale.sharding.lite import lite_outputs, lite_subset


def per_example_loss(out: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy per example (integer labels) or squared error averaged over output dims (regression)."""
    if y.dtype in (torch.int64, torch.int32):
        return F.cross_entropy(out.float(), y, reduction="none")
    return ((out.float() - y) ** 2).reshape(len(y), -1).mean(1)


def chunk(n: int, rank: int, world: int) -> slice:
    """Rank's contiguous share of n examples (sizes differ by at most one)."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


class FirstOrderLearner:
    def __init__(self, spec: JobSpec, make_model: Any, rank: int, world: int):
        self.spec, self.rank, self.world = spec, rank, world
        self.reptile = spec.algorithm.name == "reptile"
        self.engine = build_engine(make_model, spec.sharding, self._inner_optimizer)
        self.model = self.engine.module  # its passes are the engine's own; its flag recomputes the blocks
        self.dtype = next(iter(self.engine.module.parameters())).dtype
        self.partitioned = any(is_partitioned(p) for p in self.engine.module.parameters())
        self.meta: Params = {}

    def recomputation(self) -> contextlib.AbstractContextManager[None]:
        """Nothing to add: the module's own `checkpoint_blocks` flag (engine.py) recomputes its blocks."""
        return contextlib.nullcontext()

    def _inner_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        """The inner loop's SGD. First-order ANIL adapts the head only: the body's group has learning rate 0, so it
        stays at the meta-parameters while the query gradient still reaches it (the body's meta-gradient)."""
        lr, alg = self.spec.algorithm.inner.lr, self.spec.algorithm
        if alg.name != "anil":
            return torch.optim.SGD(model.parameters(), lr=lr)
        named = list(model.named_parameters())
        head = [p for n, p in named if n.startswith(alg.head_prefix)]
        body = [p for n, p in named if not n.startswith(alg.head_prefix)]
        return torch.optim.SGD([{"params": head, "lr": lr}, {"params": body, "lr": 0.0}], lr=lr)

    def load(self, params: NumpyParams) -> None:
        """The published meta-parameters, kept in this rank's layout: its ZeRO-3 partition, or whole."""
        device = self.engine.device
        if self.partitioned:
            self.meta = {k: partition_of(v, self.rank, self.world).to(device) for k, v in params.items()}
        else:
            self.meta = {k: torch.tensor(v, dtype=torch.float32, device=device) for k, v in params.items()}

    def reset(self) -> None:
        set_local_params(self.engine, self.meta)

    # ------------------------------------------------------------------------------------ one task
    def _loss(self, x: Tensor, y: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """This rank's share of the mean loss over the task's n examples, scaled by world so that the engine's
        averaging over ranks gives the mean; also the rank's (loss sum, correct count) for metrics."""
        n, part = len(y), chunk(len(y), self.rank, self.world)
        xs, ys = x[part].to(self.dtype), y[part]
        h = self.spec.sharding.support_backprop_subset
        if generator is not None and h is not None:
            mask = lite_subset(n, h, generator)[part]
            out = lite_outputs(self.engine, xs, mask, n / h)
        else:
            out = self.engine(xs)
        if not torch.is_grad_enabled():  # a no_grad forward leaves ZeRO-3's gathered copies for no backward to free
            self.engine.empty_partition_cache()
        losses = per_example_loss(out, ys)
        correct = (out.detach().argmax(-1) == ys).sum().float() if ys.dtype == torch.int64 else torch.tensor(0.0)
        return losses.sum() * (self.world / n), losses.detach().sum(), correct

    def adapt(self, task: Task, steps: int, generator: torch.Generator | None) -> None:
        for _ in range(steps):
            loss, _, _ = self._loss(task.support_x, task.support_y, generator)
            self.engine.backward(loss)
            self.engine.step()

    def _query_metrics(self, task: Task, stats: Tensor) -> dict[str, float]:
        """The task's mean query loss and accuracy from its [loss sum, correct] over all ranks."""
        n = len(task.query_y)
        metrics = {"loss": float(stats[0]) / n}
        if task.query_y.dtype == torch.int64:
            metrics["accuracy"] = float(stats[1]) / n
        return metrics

    def task_direction(self, task: Task, generator: torch.Generator | None = None) -> tuple[Params, dict[str, float]]:
        """This rank's partition of the task's meta-gradient (FOMAML) or Reptile delta, and the task's metrics."""
        self.reset()
        self.adapt(task, self.spec.algorithm.inner.steps, generator)
        if self.reptile:
            with torch.no_grad():
                _, loss_sum, correct = self._loss(task.query_x, task.query_y)
            adapted = local_params(self.engine)
            direction = {k: self.meta[k] - adapted[k] for k in self.meta}
        else:
            loss, loss_sum, correct = self._loss(task.query_x, task.query_y)
            self.engine.backward(loss)
            direction = local_grads(self.engine)
            self.engine.step()  # clears the engine's gradient state; its parameters are reset before the next use
        stats = torch.stack([loss_sum, correct])
        dist.all_reduce(stats)
        return direction, self._query_metrics(task, stats)

    # ------------------------------------------------------------------------------------ work items
    def meta_gradient(
        self, tasks: list[Task], generators: list[torch.Generator | None], slots: list[int]
    ) -> MetaGradient:
        """The summed direction of the finite tasks, in this rank's layout. A task's finiteness is all-reduced, so
        every rank leaves out the same tasks."""
        total = {k: torch.zeros_like(v) for k, v in self.meta.items()}
        metrics: dict[str, float] = {}
        bad, count = [], 0
        for slot, task, gen in zip(slots, tasks, generators):
            direction, task_metrics = self.task_direction(task, gen)
            finite = torch.tensor([float(all(torch.isfinite(d).all() for d in direction.values()))])
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            if not finite.item():
                bad.append(slot)
                continue
            for k, d in direction.items():
                total[k].add_(d)
            for k, v in task_metrics.items():
                metrics[k] = metrics.get(k, 0.0) + v
            count += 1
        return MetaGradient(total, count, metrics, bad)

    def evaluate(self, tasks: list[Task], steps: int | None) -> list[dict[str, float]]:
        out = []
        for task in tasks:
            self.reset()
            self.adapt(task, self.spec.algorithm.inner.steps if steps is None else steps, None)
            with torch.no_grad():
                _, loss_sum, correct = self._loss(task.query_x, task.query_y)
            stats = torch.stack([loss_sum, correct])
            dist.all_reduce(stats)
            out.append(self._query_metrics(task, stats))
        return out
