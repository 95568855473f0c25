"""First-order meta-learning (FOMAML, Reptile) with the inner loop run by a DeepSpeed engine, at any ZeRO stage.

Tasks run one after another; each task's examples are split over the ranks (data parallel within the task), so the
engine's gradient averaging gives the whole-task gradient. Per task:
  reset   copy the meta-parameters (kept here in the engine's local layout) into the engine's partitions;
  adapt   `inner.steps` SGD steps through the engine (engine.backward + engine.step, SGD at the inner lr);
  meta    FOMAML: one more backward on the query loss, whose reduce-scattered gradient partition is this rank's
          share of the task's meta-gradient; Reptile: meta - adapted, partition by partition.
The meta-gradient is summed partition-wise and the meta-optimiser (Adam/SGD: elementwise, so partition-wise Adam is
whole-model Adam) steps each rank's partitions; no rank and no coordinator ever holds the whole model.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from metascale.cluster.coordinator import NonFiniteError
from metascale.cluster.optim import lr_at, make_optimizer, set_lr
from metascale.config import JobSpec
from metascale.data.tasks import Task
from metascale.sharding.engine import Params, build_engine, is_partitioned, local_grads, local_params, set_local_params
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


class ShardedFirstOrder:
    def __init__(self, spec: JobSpec, make_model: Any, rank: int, world: int):
        self.spec, self.rank, self.world = spec, rank, world
        self.reptile = spec.algorithm.name == "reptile"
        self.engine = build_engine(make_model, spec.sharding, self._inner_optimizer)
        self.dtype = next(iter(self.engine.module.parameters())).dtype
        self.meta = {k: v.requires_grad_(True) for k, v in local_params(self.engine).items()}
        self.optimizer = make_optimizer(spec.outer, list(self.meta.values()))
        self.partitioned = any(is_partitioned(p) for p in self.engine.module.parameters())

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

    # ------------------------------------------------------------------------------------------ state
    def load_full(self, full: Params) -> None:
        """Sets the meta-parameters from whole tensors (tests and warm starts): each rank keeps its partition."""
        from metascale.sharding.engine import partition_of

        with torch.no_grad():
            for k, p in self.meta.items():
                v = full[k].float()
                p.copy_(partition_of(v, self.rank, self.world) if p.shape != v.shape else v)

    def reset(self) -> None:
        set_local_params(self.engine, {k: v.detach() for k, v in self.meta.items()})

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
        if not torch.is_grad_enabled():
            self.engine.empty_partition_cache()  # a no_grad forward leaves ZeRO-3's gathered copies for no backward to free
        losses = per_example_loss(out, ys)
        correct = (out.detach().argmax(-1) == ys).sum().float() if ys.dtype == torch.int64 else torch.tensor(0.0)
        return losses.sum() * (self.world / n), losses.detach().sum(), correct

    def adapt(self, task: Task, steps: int, generator: torch.Generator | None) -> None:
        for _ in range(steps):
            loss, _, _ = self._loss(task.support_x, task.support_y, generator)
            self.engine.backward(loss)
            self.engine.step()

    def task_direction(self, task: Task, generator: torch.Generator | None = None) -> tuple[Params, Tensor]:
        """This rank's partition of the task's meta-gradient (FOMAML) or Reptile delta, and the task's
        [query loss sum, correct, count] summed over ranks."""
        self.reset()
        self.adapt(task, self.spec.algorithm.inner.steps, generator)
        if self.reptile:
            with torch.no_grad():
                _, loss_sum, correct = self._loss(task.query_x, task.query_y)
            adapted = local_params(self.engine)
            direction = {k: self.meta[k].detach() - adapted[k] for k in self.meta}
        else:
            loss, loss_sum, correct = self._loss(task.query_x, task.query_y)
            self.engine.backward(loss)
            direction = local_grads(self.engine)
            self.engine.step()  # clears the engine's gradient state; its parameters are reset before the next use
        stats = torch.stack([loss_sum, correct, torch.tensor(float(len(task.query_y)))])
        dist.all_reduce(stats[:2])
        return direction, stats

    # ------------------------------------------------------------------------------------ meta-step
    def meta_step(self, step: int, tasks: list[Task], generators: list[torch.Generator | None]) -> dict[str, Any]:
        total = {k: torch.zeros_like(v) for k, v in self.meta.items()}
        sums, bad, count = torch.zeros(3), [], 0
        for i, (task, gen) in enumerate(zip(tasks, generators)):
            direction, stats = self.task_direction(task, gen)
            finite = torch.tensor([float(all(torch.isfinite(d).all() for d in direction.values()))])
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            if not finite.item():
                stop_if_asked(self.spec, step_slots=i)
                bad.append(i)
                continue
            for k, d in direction.items():
                total[k].add_(d)
            sums += stats
            count += 1
        if bad and self.spec.executor.nonfinite == "skip_step":
            count, sums = 0, torch.zeros(3)
        if count:
            for k, p in self.meta.items():
                p.grad = total[k] / count
            if self.spec.outer.grad_clip:
                self._clip(self.spec.outer.grad_clip)
            set_lr(self.optimizer, lr_at(self.spec.outer, step))
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return {"tasks": count, "nonfinite": bad, **_metrics(sums, count, tasks)}

    def _clip(self, max_norm: float) -> None:
        """Global-norm clipping over the partitions (their squared norms summed over ranks under ZeRO-3)."""
        sq = torch.stack([p.grad.pow(2).sum() for p in self.meta.values()]).sum()
        if self.partitioned:
            dist.all_reduce(sq)
        scale = (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
        for p in self.meta.values():
            p.grad.mul_(scale)

    def evaluate(self, tasks: list[Task], steps: int | None) -> list[dict[str, float]]:
        out = []
        for task in tasks:
            self.reset()
            self.adapt(task, self.spec.algorithm.inner.steps if steps is None else steps, None)
            with torch.no_grad():
                _, loss_sum, correct = self._loss(task.query_x, task.query_y)
            stats = torch.stack([loss_sum, correct])
            dist.all_reduce(stats)
            out.append(_metrics(torch.cat([stats, torch.tensor([float(len(task.query_y))])]), 1, [task]))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"meta": {k: v.detach().clone() for k, v in self.meta.items()}, "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for k, p in self.meta.items():
                p.copy_(state["meta"][k])
        self.optimizer.load_state_dict(state["optimizer"])


def stop_if_asked(spec: JobSpec, step_slots: int | list[int]) -> None:
    """executor.nonfinite=stop: every rank saw the same all-reduced flag, so all raise here together, before
    anything of the step is applied (the driver reports the first rank's error and ends the group)."""
    if spec.executor.nonfinite == "stop":
        raise NonFiniteError(f"non-finite meta-gradient in slot(s) {step_slots} (executor.nonfinite=stop)")


def _metrics(sums: Tensor, count: int, tasks: list[Task]) -> dict[str, float]:
    """Mean query loss per example and accuracy, as the un-sharded path reports them (per task, then over tasks)."""
    if not count:
        return {}
    per_task = sums[2] / max(count, 1)  # examples per task (tasks share shapes)
    m = {"loss": float(sums[0] / count / per_task)}
    if tasks[0].query_y.dtype == torch.int64:
        m["accuracy"] = float(sums[1] / count / per_task)
    return m
