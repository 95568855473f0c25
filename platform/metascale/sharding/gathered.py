"""Second-order meta-learning (MAML, Meta-SGD, ANIL, learned_hparams, learned_loss; reverse or mixed) at ZeRO-3.

ZeRO-3 keeps each meta-parameter as a flat partition per rank and gathers whole tensors in forward hooks on the
engine's modules; torch.func's functional_call swaps whole tensors into the module and differentiates through the
inner loop (double backward, forward-over-reverse), which those hooks cannot serve. So a work item runs in three
phases instead of through the engine's forward and backward:
  gather   `deepspeed.zero.GatheredParameters` over every meta-parameter at once: whole tensors on every
           rank for the item's duration;
  compute  tasks dealt in rounds (rank r takes tasks r, r + world, ...); each rank runs the algorithm's own
           `task_objective` on the whole tensors, through a hook-free twin of the model (its weights on the meta
           device, so it holds nothing), and `torch.autograd.grad` gives the task's meta-gradient, summed per rank
           into one flat buffer; a non-finite task is left out by its own rank (nothing else is collective);
  scatter  the gathered copies are released (partitions only at rest), the flat sums are all-reduced, and each rank
           keeps its ZeRO-3 partition of each tensor: the layout `RankGroup.combine` reassembles, as for first order.
The engine has no optimiser: the coordinator owns the meta-optimiser and nothing here steps the engine.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from metascale.algorithms import build_algorithm
from metascale.algorithms.executor import MetaGradient
from metascale.cluster.messages import NumpyParams
from metascale.config import JobSpec
from metascale.data.tasks import Task
from metascale.extras import require
from metascale.sharding.engine import Params, build_engine, partition_of
from metascale.sharding.second_order import (
    cast_task,
    evaluate_dealt,
    functional_blocks,
    meta_module,
    recomputed_blocks,
    sum_over_ranks,
)


def hook_free_twin(make_model: Any, model: nn.Module) -> nn.Module:
    """The model's structure without its weights (meta device) and with `model`'s (persistent) buffers: what the
    algorithm's functional_call runs, so that DeepSpeed's hooks on `model` never see the whole tensors swapped in."""
    with torch.device("meta"):
        twin = make_model()
    twin.load_state_dict(dict(model.named_buffers()), strict=False, assign=True)
    return twin


class GatheredSecondOrderLearner:
    def __init__(self, spec: JobSpec, make_model: Any, rank: int, world: int):
        self.spec, self.rank, self.world = spec, rank, world
        # memory_efficient_linear off: zero.Init would otherwise replace torch.nn.functional.linear process-wide
        # with a custom autograd.Function that has no forward-mode rule (mixed mode's jvp fails on it).
        self.engine = build_engine(
            meta_module(spec, make_model),
            functional_blocks(spec.sharding),
            lambda module: None,
            {"memory_efficient_linear": False},
        )
        self.model = hook_free_twin(make_model, self.engine.module.model)  # what the objectives run through
        self.alg = build_algorithm(spec.algorithm, self.model)
        self.dtype = next(iter(self.engine.module.parameters())).dtype

    def recomputation(self) -> contextlib.AbstractContextManager[None]:
        """What every objective runs inside (and Rank.held reports from)."""
        return recomputed_blocks(self.spec)

    def params(self) -> dict[str, Tensor]:
        """The engine's (partitioned) parameters by meta-parameter name."""
        return self.engine.module.named_meta()

    @torch.no_grad()
    def load(self, params: NumpyParams) -> None:
        """The published meta-parameters, cut to this rank's partitions (the whole arrays are never copied)."""
        for k, p in self.params().items():
            p.ds_tensor.copy_(partition_of(params[k], self.rank, self.world).view(p.ds_tensor.shape))

    @contextlib.contextmanager
    def _gathered(self) -> Iterator[Params]:
        """Whole meta-parameters on every rank inside the context, as leaves over the gathered storage (no copy) that
        autograd differentiates with respect to; partitions again after it (modifier_rank None: nothing is broadcast
        back, and nothing here writes to the gathered tensors). The leaves are dropped first, so that no reference
        keeps the whole storage alive past the context."""
        params, shapes = self.params(), self.engine.module.meta_shapes()
        with require("deepspeed").zero.GatheredParameters(list(params.values()), modifier_rank=None):
            whole = {k: p.data.detach().view(shapes[k]).requires_grad_() for k, p in params.items()}
            try:
                yield whole
            finally:
                whole.clear()

    def meta_gradient(self, tasks: list[Task], generators: list[Any], slots: list[int]) -> MetaGradient:
        """This rank's partition of the finite tasks' summed meta-gradient; the group's metrics and non-finite
        slots (every rank returns the same)."""
        sizes = {k: p.ds_numel for k, p in self.params().items()}
        flat = torch.zeros(sum(sizes.values()), device=self.engine.device)
        total = dict(zip(sizes, flat.split(list(sizes.values()))))
        metrics: dict[str, float] = {}
        bad: list[int] = []
        with self._gathered() as whole:
            for i in range(self.rank, len(tasks), self.world):
                if not self._add_task(whole, tasks[i], total, metrics):
                    bad.append(slots[i])
        dist.all_reduce(flat)
        mine = {k: partition_of(t, self.rank, self.world) for k, t in total.items()}
        everyone: list[Any] = [None] * self.world
        dist.all_gather_object(everyone, bad)
        bad = sorted(s for b in everyone for s in b)
        return MetaGradient(mine, len(tasks) - len(bad), sum_over_ranks(metrics), bad)

    def _add_task(self, whole: Params, task: Task, total: Params, metrics: dict[str, float]) -> bool:
        """Adds one task's meta-gradient (flat, float32) and metrics; False, adding nothing, if it is not finite."""
        with self.recomputation():
            out = self.alg.task_objective(whole, cast_task(task, self.dtype))
        grads = torch.autograd.grad(out.objective.float(), list(whole.values()), allow_unused=True)
        grads = [torch.zeros_like(v) if g is None else g for g, v in zip(grads, whole.values())]
        if not (torch.isfinite(out.objective).all() and all(torch.isfinite(g).all() for g in grads)):
            return False
        for k, g in zip(whole, grads):
            total[k].add_(g.reshape(-1).float())
        for k, v in out.metrics.items():
            metrics[k] = metrics.get(k, 0.0) + float(v)
        return True

    def evaluate(self, tasks: list[Task], steps: int | None) -> list[dict[str, float]]:
        return evaluate_dealt(self.alg, self._gathered(), tasks, steps, self.dtype)
