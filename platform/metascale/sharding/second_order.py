"""Second-order meta-learning (MAML, Meta-SGD, ANIL, learned_hparams, learned_loss) through a DeepSpeed engine at
ZeRO stages 0-2 (stage 3: sharding/gathered.py).

The engine's module holds the published meta-parameters (the model plus the algorithm's own, e.g. Meta-SGD's
per-weight learning rates), whole on every rank, as torch.func needs them.
Tasks are dealt to the ranks in rounds (rank r takes tasks r, r + world, ...); in each round every rank runs the
algorithm's own `task_objective` on its task (functional_call on the module's parameters, inner gradients with
create_graph) and calls `engine.backward` once, so the engine's reduction sums the round's meta-gradients over the
ranks (stage 2: reduce-scattered into partitions, then gathered whole for the coordinator). The coordinator owns
the meta-optimiser; the engine's own optimiser is SGD at rate 0, stepped only to clear the reduced gradients.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from metascale.algorithms import build_algorithm
from metascale.algorithms.executor import MetaGradient
from metascale.cluster.messages import NumpyParams
from metascale.config import JobSpec, ShardingSpec
from metascale.data.tasks import Task
from metascale.models.checkpointing import checkpointed_blocks
from metascale.sharding.engine import build_engine

SEP = "/"  # module attribute names cannot hold '.', so extra meta-parameter names (e.g. 'lr.head.weight') use '/'


class MetaParameters(nn.Module):
    """The model plus the algorithm's extra meta-parameters (Meta-SGD's learning rates, learned_hparams' per-layer
    rates and decays, learned_loss' loss network) as one module. DeepSpeed flattens parameters into buckets and
    partitions, which a 0-dim tensor cannot join (stages 1-3 fail on it), so a scalar is held as one element and
    handed to the algorithm as a 0-dim view."""

    def __init__(self, model: nn.Module, extra: dict[str, Tensor]):
        super().__init__()
        self.model = model
        self.scalars = {k for k, v in extra.items() if v.dim() == 0}
        self.extra = nn.ParameterDict(
            {k.replace(".", SEP): nn.Parameter(v.detach().clone().reshape(v.shape or (1,))) for k, v in extra.items()}
        )

    def named_meta(self) -> dict[str, nn.Parameter]:
        """The engine's parameters by meta-parameter name (what DeepSpeed's own functions take)."""
        return {**dict(self.model.named_parameters()), **{k.replace(SEP, "."): v for k, v in self.extra.items()}}

    def meta_shapes(self) -> dict[str, tuple[int, ...]]:
        """Each meta-parameter's own (whole) shape."""
        return {
            k: () if k in self.scalars else tuple(getattr(p, "ds_shape", p.shape)) for k, p in self.named_meta().items()
        }

    def meta_params(self) -> dict[str, Tensor]:
        """The meta-parameters as the algorithm takes them (whole: stages 0-2, or gathered at ZeRO-3)."""
        return {k: p.view(()) if k in self.scalars else p for k, p in self.named_meta().items()}


def meta_module(spec: JobSpec, make_model: Any) -> Any:
    """A maker of the MetaParameters module (the engine's module of a second-order learner)."""

    def make() -> nn.Module:
        model = make_model()
        alg = build_algorithm(spec.algorithm, model)
        own = {k: _shaped(p) for k, p in model.named_parameters()}
        return MetaParameters(model, {k: v for k, v in alg.init(own).items() if k not in own})

    return make


def _shaped(p: Tensor) -> Tensor:
    """`p`, or under zero.Init (whose parameters hold no data) a stand-in of its whole shape that allocates nothing,
    so that `init` sizes Meta-SGD's learning rates by the whole parameter (zero.Init then partitions them)."""
    return torch.empty((), dtype=p.dtype, device=p.device).expand(p.ds_shape) if hasattr(p, "ds_shape") else p


class SecondOrderLearner:
    def __init__(self, spec: JobSpec, make_model: Any, rank: int, world: int):
        self.spec, self.rank, self.world = spec, rank, world
        self.engine = build_engine(
            meta_module(spec, make_model),
            functional_blocks(spec.sharding),
            lambda module: torch.optim.SGD(module.parameters(), lr=0.0),
        )
        self.model = self.engine.module.model  # what the objectives run through (functional_call)
        self.alg = build_algorithm(spec.algorithm, self.model)
        self.dtype = next(iter(self.engine.module.parameters())).dtype

    def params(self) -> dict[str, Tensor]:
        return self.engine.module.meta_params()

    def recomputation(self) -> contextlib.AbstractContextManager[None]:
        """What every objective runs inside (and Rank.held reports from)."""
        return recomputed_blocks(self.spec)

    @torch.no_grad()
    def load(self, params: NumpyParams) -> None:
        """The published meta-parameters, whole: the compute copy and the ZeRO optimiser's fp32 master copy."""
        from deepspeed.utils import safe_set_full_fp32_param

        for k, p in self.engine.module.named_meta().items():
            whole = torch.tensor(params[k], dtype=torch.float32, device=p.device).reshape(p.shape)
            p.copy_(whole)
            safe_set_full_fp32_param(p, whole)

    def meta_gradient(self, tasks: list[Task], generators: list[Any], slots: list[int]) -> MetaGradient:
        """The summed meta-gradient of the finite tasks (whole, identical on every rank after the reduction).

        A task whose objective is not finite is found with one all-gather per round, before backward; its rank
        back-propagates zero times the same computation on a blank task instead (the engine's collectives and
        gradient buckets must stay aligned: ZeRO-2 buckets gradients in the order they arrive), as does a rank with
        no task in the last round. A round whose reduced gradient is not finite although every objective was is
        left out whole, its tasks reported: which task broke it cannot be told apart after the reduction."""
        total = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in self.params().items()}
        metrics: dict[str, float] = {}
        bad: list[int] = []
        for start in range(0, len(tasks), self.world):
            mine = start + self.rank
            out = None
            if mine < len(tasks):
                with self.recomputation():
                    out = self.alg.task_objective(self.params(), cast_task(tasks[mine], self.dtype))
            finite = out is not None and bool(torch.isfinite(out.objective).all())
            flags = [torch.zeros(2) for _ in range(self.world)]
            dist.all_gather(flags, torch.tensor([float(out is not None), float(finite)]))
            round_slots = [slots[start + r] for r, f in enumerate(flags) if f[0] and f[1]]
            bad += [slots[start + r] for r, f in enumerate(flags) if f[0] and not f[1]]
            if finite:
                objective = out.objective.float()
            else:
                objective = self._blank_objective(tasks[min(mine, len(tasks) - 1)])
            self.engine.backward(objective * self.world)  # the engine averages over ranks: world x mean = sum
            grads = self._reduced_grads()
            self.engine.step()  # clears the reduced gradients (the optimiser's rate is 0)
            if not all(torch.isfinite(g).all() for g in grads.values()):
                bad += round_slots
                continue
            for k, g in grads.items():
                total[k].add_(g)
            if finite:
                for k, v in out.metrics.items():
                    metrics[k] = metrics.get(k, 0.0) + float(v)
        return MetaGradient(total, len(tasks) - len(bad), sum_over_ranks(metrics), sorted(bad))

    def _reduced_grads(self) -> dict[str, Tensor]:
        """The whole gradient the last `engine.backward` reduced, keyed by meta-parameter name (stages 1-2: gathered
        from the ranks' partitions; every rank calls this)."""
        from deepspeed.utils import safe_get_full_grad

        shapes, out = self.engine.module.meta_shapes(), {}
        for k, p in self.engine.module.named_meta().items():
            g = safe_get_full_grad(p)
            out[k] = torch.zeros(shapes[k]) if g is None else g.detach().float().reshape(shapes[k]).clone()
        return out

    def _blank_objective(self, task: Task) -> Tensor:
        """Zero times the objective of `task` with zeroed inputs: the same graph, every gradient exactly zero."""
        blank = dataclasses.replace(
            task, support_x=torch.zeros_like(task.support_x), query_x=torch.zeros_like(task.query_x)
        )
        with self.recomputation():
            return self.alg.task_objective(self.params(), cast_task(blank, self.dtype)).objective.float() * 0.0

    def evaluate(self, tasks: list[Task], steps: int | None) -> list[dict[str, float]]:
        return evaluate_dealt(self.alg, contextlib.nullcontext(self.params()), tasks, steps, self.dtype)


def functional_blocks(s: ShardingSpec) -> ShardingSpec:
    """`s` without the model's own `checkpoint_blocks` flag: that recomputes a block with the module's own weights,
    but a second-order objective runs the model through `functional_call` on other tensors (the adapted weights; at
    ZeRO-3 the twin's own are on the meta device), which must be recomputed instead (`recomputed_blocks`)."""
    return s.model_copy(update={"activation_checkpointing": False})


def recomputed_blocks(spec: JobSpec) -> contextlib.AbstractContextManager[None]:
    """`sharding.activation_checkpointing` for a second-order objective: each block recomputed in the backward pass
    with the tensors `functional_call` substituted (models/checkpointing.py: checkpointed_blocks)."""
    return checkpointed_blocks(spec.sharding.activation_checkpointing)


def evaluate_dealt(
    alg: Any,
    params: contextlib.AbstractContextManager[dict[str, Tensor]],
    tasks: list[Task],
    steps: int | None,
    dtype: torch.dtype,
) -> list[dict[str, float]]:
    """Every task's metrics after adaptation, in task order on every rank. The tasks are dealt to the ranks (rank r
    scores tasks r, r + world, ...) on the meta-parameters `params` gives (ZeRO-3: gathered whole for the scoring
    only, released before the all-gather of the scores)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = []
    with params as meta, torch.no_grad():
        for task in tasks[rank::world]:
            out = alg.task_objective(meta, cast_task(task, dtype), steps=steps)
            mine.append({k: float(v) for k, v in out.metrics.items()})
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, mine)
    return [everyone[i % world][i // world] for i in range(len(tasks))]


def sum_over_ranks(metrics: dict[str, float]) -> dict[str, float]:
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, metrics)
    total: dict[str, float] = {}
    for m in everyone:
        for k, v in m.items():
            total[k] = total.get(k, 0.0) + v
    return total


def cast_task(task: Task, dtype: torch.dtype) -> Task:
    return task.to(task.support_x.device, dtype)
