"""A meta-learning worker: materialises its slots' tasks and runs the algorithm core on them.

The same class runs as a Ray actor (the default) or inside the driver (`cluster.address: inline`, for debugging).
It holds no training state: meta-parameters arrive with every call, tasks are pure functions of (seed, step, slot),
so a restarted or different worker recomputes any slot bit for bit.
"""

from __future__ import annotations

import os
import socket
import time
from functools import partial
from typing import Any, Callable, Sequence

import numpy as np
import torch

from metascale.algorithms import build_algorithm
from metascale.algorithms.base import Params
from metascale.algorithms.executor import meta_gradient, resolve_strategy
from metascale.cluster import allreduce
from metascale.config import JobSpec
from metascale.data import build_task_source, output_dim
from metascale.data.tasks import Split, TaskBatch, TaskSource, held_out, online_stream
from metascale.models import build_model

NumpyParams = dict[str, np.ndarray]

# glibc allocator settings (FIELD-NOTES: freed memory faulted back in slowly and stalled meta-steps 30x).
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


class MetaWorker:
    def __init__(self, spec: dict[str, Any] | JobSpec, worker_id: int = 0):
        self.spec = spec if isinstance(spec, JobSpec) else JobSpec.model_validate(spec)
        self.worker_id = worker_id
        ex = self.spec.executor
        torch.set_num_threads(ex.threads)
        self.device = resolve_device(ex.device)
        self.dtype = getattr(torch, ex.dtype)
        model = build_model(self.spec.model, output_dim(self.spec.data)).to(self.device, self.dtype)
        self.alg = build_algorithm(self.spec.algorithm, model)
        self.strategy = resolve_strategy(ex.strategy, self.device)
        self._sources: dict[Split, TaskSource] = {}

    def source(self, split: Split) -> TaskSource:
        if split not in self._sources:
            self._sources[split] = build_task_source(self.spec.data, split, self.spec.seed)
        return self._sources[split]

    def _params(self, params: NumpyParams) -> dict[str, torch.Tensor]:
        return {k: torch.tensor(v, device=self.device, dtype=self.dtype) for k, v in params.items()}

    def compute(self, step: int, slots: Sequence[int], params: NumpyParams) -> dict[str, Any]:
        """The summed meta-gradient of this step's `slots`, with timing for straggler and data-wait reports."""
        out, grads = self._compute(partial(self.source("train").batch, step, slots), slots, params)
        return {**out, "grads": to_numpy(grads)}

    def compute_online(self, arrived: int, tasks: Sequence[int], params: NumpyParams) -> dict[str, Any]:
        """FTML: the summed meta-gradient of the online stream's `tasks` (data.tasks.online_stream), all arrived by
        meta-step `arrived`."""
        if max(tasks) > arrived:
            raise ValueError(f"online task {max(tasks)} has not arrived by meta-step {arrived}")
        out, grads = self._compute(partial(online_stream, self.source("train"), tasks), tasks, params)
        return {**out, "grads": to_numpy(grads)}

    def _compute(
        self, load: Callable[[], TaskBatch], slots: Sequence[int], params: NumpyParams
    ) -> tuple[dict[str, Any], Params]:
        t0 = time.perf_counter()
        batch = load().to(self.device, self.dtype)
        t1 = time.perf_counter()
        mg = meta_gradient(self.alg, self._params(params), batch, self.strategy, slots)
        t2 = time.perf_counter()
        return {
            "tasks": mg.tasks,
            "metrics": mg.metrics,
            "nonfinite_slots": mg.nonfinite_slots,
            "worker": self.worker_id,
            "host": f"{socket.gethostname()}:{os.getpid()}",
            "data_s": t1 - t0,
            "compute_s": t2 - t1,
        }, mg.grads

    # All-reduce aggregation (cluster/allreduce.py): the process group lives in this worker's process.
    def group_endpoint(self, loopback: bool) -> tuple[str, int]:
        return allreduce.endpoint(loopback)

    def group_join(self, address: str, port: int, rank: int, world: int) -> None:
        allreduce.join(address, port, rank, world, self.device)

    def compute_reduced(self, step: int, slots: Sequence[int], params: NumpyParams) -> dict[str, Any]:
        load = partial(self.source("train").batch, step, slots)
        return allreduce.reduced_compute(*self._compute(load, slots, params))

    def fitness(self, step: int, pairs: Sequence[int], params: NumpyParams) -> dict[str, Any]:
        """ES: the fitness of theta +/- sigma * eps_pair for each pair, on the step's `outer.es.tasks` tasks. The noise
        is regenerated from (seed, step, pair), so only scalars go back, however large the model."""
        from metascale.algorithms import es

        cfg = self.spec.outer.es
        t0 = time.perf_counter()
        batch = self.source("train").batch(step, range(cfg.tasks)).to(self.device, self.dtype)
        t1 = time.perf_counter()
        theta = self._params(params)
        scores = []
        for pair in pairs:
            eps = es.noise(theta, self.spec.seed, step, pair)
            plus, minus = (
                es.fitness(self.alg, es.perturb(theta, eps, sign * cfg.sigma), batch, cfg.objective) for sign in (1, -1)
            )
            scores.append((pair, plus, minus))
        return {
            "fitness": scores,
            "es": (self.spec.seed, cfg.sigma, cfg.shaping),  # what the noise and shaping were, for the coordinator
            "tasks": 2 * len(pairs) * cfg.tasks,
            "worker": self.worker_id,
            "data_s": t1 - t0,
            "compute_s": time.perf_counter() - t1,
        }

    def evaluate(self, step: int | None, slots: Sequence[int], params: NumpyParams, split: Split, steps: int | None):
        """Per-episode post-adaptation metrics (a list, one dict per slot) on the tasks (step, slot), or with `step`
        None on the held-out episodes (`data.tasks.held_out`: spread over the split by streaming sources)."""
        meta = self._params(params)
        source = self.source(split)
        batch = (held_out(source, slots) if step is None else source.batch(step, slots)).to(self.device, self.dtype)
        results = []
        with torch.no_grad():
            for task in batch.tasks():
                out = self.alg.task_objective(meta, task, steps=steps)
                results.append({k: float(v) for k, v in out.metrics.items()})
        return results

    def ping(self) -> str:
        return f"{socket.gethostname()}:{os.getpid()}"

    def node(self) -> str:
        """The Ray node this worker runs on (placement checks, straggler reports)."""
        import ray

        return ray.get_runtime_context().get_node_id()
