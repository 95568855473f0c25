"""A replica: one worker process that materialises its slots' tasks and runs the algorithm core on them.

The same class runs as a Ray actor (the default) or inside the driver (`cluster.address: inline`, for debugging).
It holds no training state: meta-parameters arrive with every call, tasks are pure functions of (seed, step, slot),
so a restarted or different replica recomputes any item bit for bit. (Truncated unrolls keep their particles' inner
states here as a cache; any other replica rebuilds them from the published history: cluster/unrolled.py.)
"""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Any

import torch

from metascale.algorithms import build_algorithm
from metascale.algorithms.executor import meta_gradient, resolve_strategy
from metascale.cluster import allreduce, faults
from metascale.cluster.messages import NumpyParams, WorkItem, WorkResult, item_tasks
from metascale.cluster.meter import CallMeter
from metascale.config import JobSpec
from metascale.data import output_dim
from metascale.data.tasks import TaskSources
from metascale.models import build_model

# glibc allocator settings: with its defaults this machine faulted freed memory back in slowly, and one MAML
# meta-step took 85 s instead of ~3; these cut minor page faults 25x and made steps ~20% faster (as in the Makefile).
ALLOCATOR_ENV = {
    "MALLOC_MMAP_THRESHOLD_": "33554432",
    "MALLOC_TRIM_THRESHOLD_": "68719476736",
    "MALLOC_TOP_PAD_": "268435456",
}


def resolve_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def to_numpy(params: dict[str, torch.Tensor]) -> NumpyParams:
    return {k: v.detach().cpu().numpy() for k, v in params.items()}


FETCH_TIMEOUT_S = 300.0  # an object-store fetch of a PPO epoch's theta_old (the item's own params come with the call)


class Replica:
    def __init__(self, spec: dict[str, Any] | JobSpec, worker: int = 0):
        self.spec = spec if isinstance(spec, JobSpec) else JobSpec.model_validate(spec)
        self.worker = worker
        ex = self.spec.executor
        torch.set_num_threads(ex.threads)
        self.device = resolve_device(ex.device)
        self.dtype = getattr(torch, ex.dtype)
        model = build_model(self.spec.model, output_dim(self.spec.data)).to(self.device, self.dtype)
        self.alg = build_algorithm(self.spec.algorithm, model, self.spec.data)
        self.strategy = resolve_strategy(ex.strategy, self.device)
        self.source = TaskSources(self.spec.data, self.spec.seed)
        self.particles = None  # outer.estimator pes/tbptt: the inner states this worker holds (cluster/unrolled.py)

    def run(self, item: WorkItem, params: NumpyParams) -> WorkResult:
        out, grads = self._run(item, params)
        out.grads = to_numpy(grads)
        return out

    def _run(self, item: WorkItem, params: NumpyParams) -> tuple[WorkResult, dict[str, torch.Tensor]]:
        """The item's result, its summed meta-gradient kept on the device (all-reduce sums it there)."""
        if item.kind in ("meta_gradient", "unroll"):
            faults.maybe_fire(item.step, self.worker)
        out, grads = WorkResult(worker=self.worker, host=f"{socket.gethostname()}:{os.getpid()}"), {}
        with CallMeter() as meter:
            if item.kind == "fitness":
                self._fitness(item, self._params(params), out, meter)
            elif item.kind == "unroll":
                from metascale.cluster.unrolled import work

                grads = work(self, item, params, out)
            else:
                batch = item_tasks(item, self.source(item.split)).to(self.device, self.dtype)
                meter.lap("data")
                meta = self._params(params)
                if item.kind == "meta_gradient":
                    with self._sampled_by(item):
                        mg = meta_gradient(self.alg, meta, batch, self.strategy, item.slots)
                    grads, out.tasks, out.metrics = mg.grads, mg.tasks, mg.metrics
                    out.nonfinite_slots = mg.nonfinite_slots
                else:
                    out.episodes = self._evaluate(meta, batch, item.inner_steps)
                    out.tasks = len(out.episodes)
            meter.lap("compute")
        out.data_s, out.compute_s = meter.laps.get("data", 0.0), meter.laps["compute"]
        out.peak_bytes = meter.peak_bytes
        return out, grads

    def _sampled_by(self, item: WorkItem) -> Any:
        """A PPO epoch's item (algorithm.maml_rl.epochs): its rollouts are sampled by theta_old, fetched here."""
        if item.sampled_by is None:
            return contextlib.nullcontext()
        old = item.sampled_by
        if not isinstance(old, dict):  # an object-store reference (the pool's put)
            import ray

            old = ray.get(old, timeout=FETCH_TIMEOUT_S)
        return self.alg.sampled_by(self._params(old))

    def _params(self, params: NumpyParams) -> dict[str, torch.Tensor]:
        return {k: torch.tensor(v, device=self.device, dtype=self.dtype) for k, v in params.items()}

    def _evaluate(self, meta: dict[str, torch.Tensor], batch: Any, steps: int | None) -> list[dict[str, float]]:
        results = []
        with torch.no_grad():
            for task in batch.tasks():
                metrics = self.alg.task_objective(meta, task, steps=steps).metrics
                results.append({k: float(v) for k, v in metrics.items()})
        return results

    def _fitness(self, item: WorkItem, theta: dict[str, torch.Tensor], out: WorkResult, meter: CallMeter) -> None:
        """ES: the fitness of theta +/- sigma * eps_pair for each pair in `item.slots`, on the step's `outer.es.tasks`
        tasks. The noise is regenerated from (seed, step, pair), so only scalars go back, however large the model."""
        from metascale.algorithms import es

        cfg = self.spec.outer.es
        batch = self.source("train").batch(item.step, range(cfg.tasks)).to(self.device, self.dtype)
        meter.lap("data")
        for pair in item.slots:
            eps = es.noise(theta, self.spec.seed, item.step, pair)
            plus, minus = (
                es.fitness(self.alg, es.perturb(theta, eps, sign * cfg.sigma), batch, cfg.objective) for sign in (1, -1)
            )
            out.fitness.append((pair, plus, minus))
        out.tasks = 2 * len(item.slots) * cfg.tasks

    # All-reduce aggregation (cluster/allreduce.py): the process group lives in this replica's process.
    def group_endpoint(self, loopback: bool) -> tuple[str, int]:
        return allreduce.endpoint(loopback)

    def group_join(self, address: str, port: int, rank: int, world: int) -> None:
        allreduce.join(address, port, rank, world, self.device)

    def run_reduced(self, item: WorkItem, params: NumpyParams) -> WorkResult:
        """`run` of a meta_gradient item whose summed gradient is then all-reduced among the replicas."""
        return allreduce.reduced(*self._run(item, params))

    def ping(self) -> str:
        return f"{socket.gethostname()}:{os.getpid()}"

    def node(self) -> str:
        """The Ray node this replica runs on (placement checks, straggler reports)."""
        import ray

        return ray.get_runtime_context().get_node_id()
