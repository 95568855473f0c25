"""One rank of a rank group: a Ray actor that joins its group's torch.distributed group and runs its share of every
work item through a DeepSpeed engine (first order: sharding/first_order.py, second order: second_order.py).

Every rank of a group receives the same WorkItem and the same published meta-parameters, materialises the same
tasks (pure functions of seed, step and slot; LITE's subsets come from a generator seeded the same way, so every
rank draws the same subset) and returns its part of the result: under ZeRO-3 its partition of the
summed meta-gradient, otherwise rank 0 the whole of it. The driver's side of the group is sharding/group.py.
"""

from __future__ import annotations

import datetime
import os
import socket
from typing import Any

import numpy as np
import torch

from metascale.cluster import faults, rendezvous
from metascale.cluster.messages import NumpyParams, WorkerBroken, WorkItem, WorkResult, item_tasks
from metascale.cluster.meter import CallMeter
from metascale.config import SECOND_ORDER, JobSpec
from metascale.data import output_dim
from metascale.data.tasks import TaskSources
from metascale.models import build_model


def lite_generator(seed: int, step: int, slot: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, step, slot]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


def build_learner(spec: JobSpec, rank: int, world: int) -> Any:
    from metascale.sharding.first_order import FirstOrderLearner
    from metascale.sharding.gathered import GatheredSecondOrderLearner
    from metascale.sharding.second_order import SecondOrderLearner

    def make_model() -> torch.nn.Module:
        torch.manual_seed(spec.seed)  # any initialisation will do: the published meta-parameters replace it
        return build_model(spec.model, output_dim(spec.data))

    if not is_second_order(spec):
        return FirstOrderLearner(spec, make_model, rank, world)
    learner = GatheredSecondOrderLearner if spec.sharding.zero_stage == 3 else SecondOrderLearner
    return learner(spec, make_model, rank, world)


def is_second_order(spec: JobSpec) -> bool:
    return spec.algorithm.name in SECOND_ORDER and not spec.algorithm.inner.first_order


def is_partitioned(spec: JobSpec) -> bool:
    """Whether the group's meta-gradient comes back one partition per rank (ZeRO-3, first and second order)."""
    return spec.sharding.zero_stage == 3


class Rank:
    def __init__(self, spec: dict[str, Any], worker: int, rank: int, world: int):
        import logging
        import warnings

        self.spec = JobSpec.model_validate(spec)
        self.worker, self.rank, self.world = worker, rank, world
        torch.set_num_threads(self.spec.executor.threads)
        warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")  # DeepSpeed's calls
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        self.source = TaskSources(self.spec.data, self.spec.seed)
        self.learner: Any = None
        self._listening: socket.socket | None = None

    def describe(self) -> tuple[str, list[str]]:
        """(Ray node id, GPU ids Ray assigned to this rank): what `setup` needs to pick this rank's device."""
        import ray

        ctx = ray.get_runtime_context()
        return ctx.get_node_id(), [str(g) for g in ctx.get_accelerator_ids().get("GPU", [])]

    def endpoint(self, loopback: bool) -> tuple[str, int]:
        """Rank 0: binds the group's rendezvous socket and says where the others connect."""
        self._listening, address, port = rendezvous.bind(loopback)
        return address, port

    def setup(self, endpoint: tuple[str, int], timeout_s: float, *ranks: tuple[str, list[str]]) -> dict[str, Any]:
        """Joins the group (gloo on CPU, NCCL on GPUs) and builds the engine; returns what the driver needs to put
        results back together: the whole shape of every meta-parameter, and where this rank runs.

        On GPUs every rank of a node sees all of that node's group GPUs (CUDA_VISIBLE_DEVICES, set before CUDA
        starts in this process) and picks its own, so NCCL can use the direct GPU-to-GPU paths between them."""
        from metascale.sharding.engine import use_group

        node, gpus = ranks[self.rank]
        backend = "nccl" if gpus else "gloo"
        if gpus:
            local = sorted({g for n, ids in ranks if n == node for g in ids}, key=int)
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(local)
            os.environ["LOCAL_RANK"] = str(local.index(gpus[0]))
            torch.cuda.set_device(local.index(gpus[0]))
        else:
            os.environ["LOCAL_RANK"] = "0"
        timeout = datetime.timedelta(seconds=timeout_s)
        rendezvous.join(*endpoint, self.rank, self.world, self._listening, backend, timeout)
        self._listening = None
        use_group(backend, timeout)
        self.learner = build_learner(self.spec, self.rank, self.world)
        shapes = self._meta_shapes()
        return {"shapes": shapes, "node": node, "host": f"{socket.gethostname()}:{os.getpid()}"}

    def _meta_shapes(self) -> dict[str, tuple[int, ...]]:
        module = self.learner.engine.module
        if hasattr(module, "meta_shapes"):
            return module.meta_shapes()
        return {k: tuple(getattr(p, "ds_shape", p.shape)) for k, p in module.named_parameters()}

    def run(self, item: WorkItem, params: NumpyParams) -> WorkResult:
        if self.learner is None:
            raise WorkerBroken(f"rank {self.rank} of worker {self.worker} is not part of a formed group")
        if item.kind == "meta_gradient":
            faults.maybe_fire(item.step, self.worker, self.rank)
        out = WorkResult(worker=self.worker, host=f"{socket.gethostname()}:{os.getpid()}")
        with CallMeter() as meter:
            tasks = item_tasks(item, self.source(item.split)).to(self.learner.engine.device).tasks()
            meter.lap("data")
            self.learner.load(params)
            if item.kind == "meta_gradient":
                seed, h = self.spec.seed, self.spec.sharding.support_backprop_subset
                gens = [lite_generator(seed, item.step, s) if h else None for s in item.slots]
                mg = self.learner.meta_gradient(tasks, gens, list(item.slots))
                out.tasks, out.metrics, out.nonfinite_slots = mg.tasks, mg.metrics, mg.nonfinite_slots
                if self.rank == 0 or is_partitioned(self.spec):
                    out.grads = {k: v.cpu().numpy() for k, v in mg.grads.items()}
            elif item.kind == "evaluate":
                out.episodes = self.learner.evaluate(tasks, item.inner_steps)
                out.tasks = len(out.episodes)
            else:
                raise ValueError(f"rank groups run meta_gradient and evaluate items, not {item.kind}")
            meter.lap("compute")
        out.data_s, out.compute_s, out.peak_bytes = meter.laps["data"], meter.laps["compute"], meter.peak_bytes
        return out

    def held(self) -> dict[str, int]:
        """Elements this rank holds of the backbone: its own partitions, the whole model's, and whole copies still
        gathered (0 after a step under ZeRO-3); the bytes of parameter and optimiser storage (sharding/engine.py:
        param_bytes); how many modules recompute their blocks in the learner's passes (first order by the model's own
        flag, second order inside `checkpointed_blocks()`: the rule of models/checkpointing.py either way). For
        operators and tests: what sharding actually did."""
        from metascale.models.checkpointing import recomputes
        from metascale.sharding.engine import is_partitioned as partitioned, param_bytes

        module = self.learner.engine.module
        params = list(module.parameters())
        with self.learner.recomputation():
            checkpointed = sum(recomputes(m) for m in self.learner.model.modules())
        return {
            "checkpointed_modules": checkpointed,
            "local_numel": sum(p.ds_tensor.numel() if partitioned(p) else p.numel() for p in params),
            "whole_numel": sum(p.ds_numel if partitioned(p) else p.numel() for p in params),
            "resident_numel": sum(p.numel() for p in params if partitioned(p)),
            "state_bytes": param_bytes(self.learner.engine),
        }
