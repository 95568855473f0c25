"""`metascale bench scaling`: weak scaling from 1 to 2 workers, and the coordinator's share of a meta-step.

Workload (one model family, sized by a knob): MAML (second order, 1 inner step, lr 0.01) on the MAML paper's sinusoid
tasks (10 shots, 10 queries), an MLP 1 -> W -> W -> W -> 1 with W chosen so that the model has ~N parameters
(0.1M, 10M, 100M), float32, `tasks_per_worker` tasks per worker per step (fixed: weak scaling), 1 torch thread per
worker, real Ray actors (RayPool) and the real Coordinator.

Each step is the training loop's step, instrumented: put (publish the parameters: one object-store put), wait (the
workers compute: their own get of the parameters, the inner loops, serialising their result), gather (ray.get of the
results into the driver), aggregate (sum in group order, divide), optimizer (Coordinator.apply: Adam).
coordinator_fraction = (put + gather + aggregate + optimizer) / step. overhead_fraction = 1 - (the slowest worker's
own data + compute seconds) / step: everything that is not inner-loop work, worker-side serialisation included.
weak_scaling_efficiency = tasks/s with 2 workers / (2 x tasks/s with 1 worker), same tasks per worker.

The machine is shared (2 cores, other engineers' jobs): configurations are interleaved step by step and each reports
its best step (minimum over `steps` measured steps after one warm-up step); the 1-minute load average is reported.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

SIZES = {"0.1M": 100_000, "10M": 10_000_000, "100M": 100_000_000}


def mlp_width(params: int, layers: int = 3) -> int:
    """W such that 1 -> W x `layers` -> 1 has ~`params` parameters: (layers-1) W^2 + (layers+2) W + 1."""
    a, b = layers - 1, layers + 2
    return int((-b + math.sqrt(b * b + 4 * a * (params - 1))) / (2 * a))


def job(params: int, workers: int, tasks_per_worker: int, aggregation: str) -> Any:
    from metascale.config import parse_spec

    w = mlp_width(params)
    return parse_spec(
        {
            "name": f"bench-scaling-{workers}w-{aggregation}",  # pools of one process need distinct actor names
            "model": {"name": "mlp", "hidden": [w, w, w]},
            "algorithm": {"name": "maml", "inner": {"steps": 1, "lr": 0.01}},
            "outer": {"meta_batch": workers * tasks_per_worker},
            "executor": {"threads": 1, "dtype": "float32"},
            "cluster": {"workers": workers, "aggregation": aggregation},
            "logging": {"wandb": {"mode": "disabled"}, "progress": False},
        }
    )


class Setup:
    """A coordinator and its pool, stepping with per-phase timings."""

    def __init__(self, params: int, workers: int, tasks_per_worker: int, aggregation: str):
        from metascale.cluster.allreduce import AllReduce
        from metascale.cluster.coordinator import Coordinator
        from metascale.cluster.estimators import items
        from metascale.cluster.pool import RayPool

        self.spec = job(params, workers, tasks_per_worker, aggregation)
        self.coord = Coordinator(self.spec)
        self.pool = RayPool(self.spec)
        self.items = lambda step: items("meta_gradient", step, self.spec.outer.meta_batch, workers)
        self.reduced = False
        self.form_s = 0.0
        if aggregation == "allreduce" and workers > 1:
            t0 = time.perf_counter()
            if not AllReduce()._form(self.pool, workers):
                raise RuntimeError("could not form the all-reduce group")
            self.form_s = time.perf_counter() - t0  # what a re-formed group costs after a fault
            self.reduced = True
        self.params = sum(p.numel() for p in self.coord.params.values())
        self.best: dict[str, float] | None = None
        self.reduce_s: float | None = None

    def step(self, record: bool) -> None:
        import ray

        from metascale.cluster.coordinator import aggregate

        t0 = time.perf_counter()
        ref = self.pool.put(self.coord.published())
        t1 = time.perf_counter()
        actors = [w.actor for w in self.pool.workers]
        refs = [
            (a.run_reduced if self.reduced else a.run).remote(item, ref)
            for a, item in zip(actors, self.items(self.coord.step))
        ]
        ray.wait(refs, num_returns=len(refs))
        t2 = time.perf_counter()
        results = ray.get(refs)
        t3 = time.perf_counter()
        worker_s = max(r.data_s + r.compute_s for r in results)
        # the collective itself: the rank that arrives last waits for nobody
        reduce_s = min((r.reduce_s for r in results if r.reduce_s is not None), default=0.0)
        result = aggregate(results)
        t4 = time.perf_counter()
        self.coord.apply(result)
        t5 = time.perf_counter()
        del ref, refs, results
        timing = {
            "put": t1 - t0,
            "wait": t2 - t1,
            "gather": t3 - t2,
            "aggregate": t4 - t3,
            "optimizer": t5 - t4,
            "step": t5 - t0,
            "worker": worker_s,
            "allreduce": reduce_s,
        }
        if record and (self.best is None or timing["step"] < self.best["step"]):
            self.best = timing

    def report(self) -> dict[str, float]:
        b = self.best
        assert b is not None
        coordinator = b["put"] + b["gather"] + b["aggregate"] + b["optimizer"]
        return {
            "step_s": round(b["step"], 4),
            "tasks_per_s": round(self.spec.outer.meta_batch / b["step"], 2),
            "coordinator_fraction": round(coordinator / b["step"], 4),
            "overhead_fraction": round(max(0.0, 1 - b["worker"] / b["step"]), 4),
            **{f"{k}_s": round(b[k], 4) for k in ("put", "wait", "gather", "aggregate", "optimizer", "worker")},
            **(
                {"allreduce_s": round(b["allreduce"], 4), "form_group_s": round(self.form_s, 3)}
                if b["allreduce"]
                else {}
            ),
        }

    def close(self) -> None:
        self.pool.shutdown()


def run(sizes: list[str], tasks_per_worker: int = 8, steps: int = 3) -> dict[str, Any]:
    """Per size: 1 worker, 2 workers with coordinator aggregation, 2 workers with all-reduce, interleaved."""
    import ray

    from metascale.cluster.replica import ALLOCATOR_ENV

    load_before = os.getloadavg()[0]
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(
        address="local",
        num_cpus=max(os.cpu_count() or 1, 5),
        include_dashboard=False,
        logging_level="ERROR",
        runtime_env={"env_vars": {**ALLOCATOR_ENV, "OMP_NUM_THREADS": "1"}},
    )
    out: dict[str, Any] = {"bench": "scaling", "tasks_per_worker": tasks_per_worker, "measured_steps": steps}
    try:
        for name in sizes:
            configs = {"1w": (1, "coordinator"), "2w": (2, "coordinator"), "2w_allreduce": (2, "allreduce")}
            setups = {k: Setup(SIZES[name], w, tasks_per_worker, agg) for k, (w, agg) in configs.items()}
            try:
                for i in range(steps + 1):  # interleaved: each configuration sees the same background load
                    for s in setups.values():
                        s.step(record=i > 0)
                rows = {k: s.report() for k, s in setups.items()}
            finally:
                for s in setups.values():
                    s.close()
            one = rows["1w"]["tasks_per_s"]
            out[name] = {
                "params": setups["1w"].params,
                "bytes": setups["1w"].params * 4,
                "weak_scaling_efficiency": round(rows["2w"]["tasks_per_s"] / (2 * one), 3),
                "weak_scaling_efficiency_allreduce": round(rows["2w_allreduce"]["tasks_per_s"] / (2 * one), 3),
                # the machine's own ceiling: a worker's inner-loop seconds alone / with a second worker beside it
                "compute_contention_ceiling": round(rows["1w"]["worker_s"] / rows["2w"]["worker_s"], 3),
                "coordinator_fraction": rows["2w"]["coordinator_fraction"],
                "coordinator_fraction_allreduce": rows["2w_allreduce"]["coordinator_fraction"],
                **rows,
            }
    finally:
        ray.shutdown()
    headline = out.get("10M") or out[sizes[0]]
    out.update(
        {
            "weak_scaling_efficiency": headline["weak_scaling_efficiency"],
            "coordinator_fraction": headline["coordinator_fraction"],
            "headline_size": "10M" if "10M" in out else sizes[0],
            "load_avg_1m_before": round(load_before, 2),
            "load_avg_1m_after": round(os.getloadavg()[0], 2),
            "cpus": os.cpu_count(),
            "workload": "MAML (2nd order, 1 inner step) sinusoid 10-shot 10-query, MLP 1-W-W-W-1, float32, 1 thread/worker",
        }
    )
    return out
