"""Second-order meta-learning (MAML, Meta-SGD, ANIL) through a DeepSpeed engine at ZeRO stages 0-2.

Here the engine's module *is* the meta-parameters and its optimiser *is* the meta-optimiser, so ZeRO-1/2 partition
the meta-optimiser state (and gradients) over the ranks. Tasks are split over the ranks; each rank runs the
algorithm's own `task_objective` (functional_call on the engine module's own parameters, inner gradients with
create_graph) and calls `engine.backward` once per task, with gradient accumulation over its tasks, so the engine
averages sum/meta_batch across ranks. ZeRO-3 is refused by the job spec: torch.func needs whole parameters.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from metascale.algorithms import build_algorithm
from metascale.cluster.optim import lr_at, make_optimizer, set_lr
from metascale.config import JobSpec
from metascale.data.tasks import Task
from metascale.sharding.engine import build_engine
from metascale.sharding.inner import stop_if_asked

SEP = "/"  # module attribute names cannot hold '.', so extra meta-parameter names (e.g. 'lr.head.weight') use '/'


class MetaParameters(nn.Module):
    """The model plus the algorithm's extra meta-parameters (Meta-SGD's learning rates) as one module."""

    def __init__(self, model: nn.Module, extra: dict[str, Tensor]):
        super().__init__()
        self.model = model
        self.extra = nn.ParameterDict({k.replace(".", SEP): nn.Parameter(v.detach().clone()) for k, v in extra.items()})

    def meta_params(self) -> dict[str, Tensor]:
        return {**dict(self.model.named_parameters()), **{k.replace(SEP, "."): v for k, v in self.extra.items()}}


class ShardedSecondOrder:
    def __init__(self, spec: JobSpec, make_model: Any, rank: int, world: int):
        self.spec, self.rank, self.world = spec, rank, world
        self.per_rank = spec.outer.meta_batch // world

        def make() -> nn.Module:
            model = make_model()
            alg = build_algorithm(spec.algorithm, model)
            own = dict(model.named_parameters())
            return MetaParameters(model, {k: v for k, v in alg.init(own).items() if k not in own})

        def optimizer(module: nn.Module) -> torch.optim.Optimizer:
            return make_optimizer(spec.outer, list(module.parameters()))

        self.engine = build_engine(make, spec.sharding, optimizer, grad_clip=spec.outer.grad_clip,
                                   accumulation=self.per_rank)
        self.alg = build_algorithm(spec.algorithm, self.engine.module.model)
        self.dtype = next(iter(self.engine.module.parameters())).dtype

    def params(self) -> dict[str, Tensor]:
        return self.engine.module.meta_params()

    @torch.no_grad()
    def load_full(self, full: dict[str, Tensor]) -> None:
        for k, p in self.params().items():
            p.copy_(full[k])
        from deepspeed.utils import safe_set_full_fp32_param

        for k, p in self.params().items():
            safe_set_full_fp32_param(p, full[k].float())

    def my_tasks(self, tasks: list[Task]) -> list[Task]:
        """Rank r takes tasks r, r+world, ... (meta_batch is a multiple of the ranks: the job spec checks it)."""
        return tasks[self.rank :: self.world]

    def meta_step(self, step: int, tasks: list[Task], generators: list[Any]) -> dict[str, Any]:
        """Ranks take their i-th tasks in lockstep. A task whose objective is not finite on any rank is found with
        one all-gather per round, before backward; its rank back-propagates zero times the same computation on a
        blank task instead (the engine's collectives and gradient buckets must stay aligned), so the task adds nothing (skip_task: the mean still divides by every task of
        the step) and is reported; under 'stop' every rank raises before backward, so nothing of the step is applied.
        The validator refuses skip_step here: the ZeRO optimiser steps inside the engine at the accumulation
        boundary."""
        set_lr(self.engine.optimizer, lr_at(self.spec.outer, step))
        sums, bad = torch.zeros(3), []
        for i, task in enumerate(self.my_tasks(tasks)):
            out = self.alg.task_objective(self.params(), _cast(task, self.dtype))
            finite = torch.tensor([float(torch.isfinite(out.objective).all())])
            everyone = [torch.zeros(1) for _ in range(self.world)]
            dist.all_gather(everyone, finite)
            objective = out.objective.float()
            if not all(bool(f.item()) for f in everyone):
                bad += [i * self.world + r for r, f in enumerate(everyone) if not f.item()]
                stop_if_asked(self.spec, bad)
            if finite.item():
                sums += torch.tensor([float(out.metrics["loss"]), float(out.metrics.get("accuracy", 0.0)), 1.0])
            else:  # zero gradients through the same graph: ZeRO-2 buckets gradients in the order they arrive
                blank = dataclasses.replace(task, support_x=torch.zeros_like(task.support_x),
                                            query_x=torch.zeros_like(task.query_x))
                objective = self.alg.task_objective(self.params(), _cast(blank, self.dtype)).objective.float() * 0.0
            self.engine.backward(objective)  # the engine divides by the accumulation count
            self.engine.step()  # steps the meta-optimiser at the accumulation boundary only
        dist.all_reduce(sums)
        n = max(float(sums[2]), 1.0)
        m = {"loss": float(sums[0]) / n}
        if tasks[0].query_y.dtype == torch.int64:
            m["accuracy"] = float(sums[1]) / n
        return {"tasks": int(sums[2]), "nonfinite": sorted(bad), **m}

    def evaluate(self, tasks: list[Task], steps: int | None) -> list[dict[str, float]]:
        mine = []
        with torch.no_grad():
            for task in self.my_tasks(tasks):
                out = self.alg.task_objective(self.params(), _cast(task, self.dtype), steps=steps)
                mine.append({k: float(v) for k, v in out.metrics.items()})
        everyone: list[Any] = [None] * self.world
        dist.all_gather_object(everyone, mine)
        return [everyone[i % self.world][i // self.world] for i in range(len(tasks))]

    def state_dict(self) -> dict[str, Any]:
        """The meta-parameters (whole: stages 0-2 replicate them) and this rank's part of the meta-optimiser: the
        ZeRO optimiser's partition of the fp32 master weights and Adam state, kept to tensors and plain values
        (checkpoints load with weights_only; the loss scaler and slice maps are rebuilt by the engine)."""
        params = {"params": {k: v.detach().clone() for k, v in self.params().items()}}
        if self.spec.sharding.precision != "fp32":  # DeepSpeed's bf16 optimiser: run.py refuses --resume
            return params
        opt = self.engine.optimizer.state_dict()
        if self.spec.sharding.zero_stage:
            opt = {k: opt[k] for k in _ZERO_STATE if k in opt}
        return {**params, "optimizer": opt}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.spec.sharding.zero_stage:  # a rigid checkpoint: each rank reads the entry at its own rank
            self.engine.optimizer.load_state_dict([state["optimizer"]] * self.world, load_optimizer_states=True,
                                                  load_from_fp32_weights=True)
        else:
            self.engine.optimizer.load_state_dict(state["optimizer"])
        self.load_full(state["params"])


_ZERO_STATE = ("base_optimizer_state", "single_partition_of_fp32_groups", "group_paddings", "param_alignment_paddings",
               "partition_count", "ds_version", "dynamic_loss_scale", "overflow", "clip_grad")


def _cast(task: Task, dtype: torch.dtype) -> Task:
    return task.to(task.support_x.device, dtype)
