"""`metascale bench scaling --sharded`: the one training runtime with rank-group workers, across nodes.

Set-up: a `ray.cluster_utils.Cluster` of 2 nodes on 127.0.0.1 (real raylets, one object store each), `groups` rank
groups of `ranks` ranks (gloo), STRICT_PACK placement with `ranks` CPUs a node, so each group lands whole on a node
of its own. Workload: FOMAML at ZeRO-3 on a ViT (dim 64, 4 blocks, 28x28 images in 7x7 patches), 5-way 1-shot
5-query episodes, 2 tasks per group per step, float32, 1 torch thread per rank.

1. max_rel_diff_vs_unsharded: the coordinator's aggregated (mean) meta-gradient of the first measured step against
   the un-sharded single-process executor on the same episodes: max over parameters of ||a - b|| / ||b||. Float32:
   the ranks reduce partial gradients in another order than one process sums them (DeepSpeed refuses float64).
2. coordinator_fraction: each measured step is the training loop's step, instrumented as in `bench scaling`:
   put (publish the meta-parameters), wait (the groups compute), gather (fetch every rank's part and put ZeRO-3
   partitions back together whole), aggregate, optimizer (Adam); coordinator = put + gather + aggregate + optimizer.
   Best (shortest) of `steps` steps after one warm-up.
3. recovered_from_rank_loss: `metascale run`'s own loop (train.py), twice over the same job: fault-free, and with
   rank 1 of group 1 exiting as meta-step 2 starts (cluster/faults.py). True when the final meta-parameters are
   bit-identical; the lost group is rebuilt and its slots recomputed within the step.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

VIT = {"name": "vit", "dim": 64, "depth": 4, "heads": 4}


def job(name: str, groups: int, ranks: int, root: str, steps: int = 4) -> Any:
    from metascale.config import parse_spec

    return parse_spec(
        {
            "name": name,
            "model": VIT,
            "data": {"source": "synthetic", "ways": 5, "shots": 1, "queries": 5},
            "algorithm": {"name": "fomaml", "inner": {"steps": 1, "lr": 0.1}},
            "outer": {"meta_batch": 2 * groups, "steps": steps},
            "eval": {"every": 0, "final_episodes": 2},
            "checkpoint": {"dir": f"{root}/{name}", "every": 0},
            "logging": {"wandb": {"mode": "disabled"}, "progress": False},
            "cluster": {"workers": groups, "cpus_per_process": 1},
            "sharding": {"engine": "deepspeed", "zero_stage": 3, "ranks": ranks},
        }
    )


def _unsharded(spec: Any, params: dict[str, Any], step: int) -> dict[str, Any]:
    import torch

    from metascale.algorithms.executor import meta_gradient
    from metascale.cluster.replica import Replica

    plain = spec.model_copy(update={"sharding": type(spec.sharding)()})
    worker = Replica(plain)
    batch = worker.source("train").batch(step, range(spec.outer.meta_batch))
    mg = meta_gradient(worker.alg, {k: torch.tensor(v) for k, v in params.items()}, batch, "per_task")
    return {k: g / mg.tasks for k, g in mg.grads.items()}


def _timed_steps(spec: Any, steps: int) -> dict[str, Any]:
    import ray

    from metascale.cluster.coordinator import Coordinator, aggregate
    from metascale.cluster.estimators import items
    from metascale.cluster.pool import RayPool

    coord, pool = Coordinator(spec), RayPool(spec)
    try:
        nodes = {n for w in pool.workers for n in w.nodes()}
        best: dict[str, float] | None = None
        diff = None
        for i in range(steps + 1):
            t0 = time.perf_counter()
            published = coord.published()
            ref = pool.put(published)
            t1 = time.perf_counter()
            work = items("meta_gradient", coord.step, spec.outer.meta_batch, pool.size)
            refs = [w.submit(item, ref) for w, item in zip(pool.workers, work)]
            ray.wait([r for rs in refs for r in rs], num_returns=sum(len(rs) for rs in refs))
            t2 = time.perf_counter()
            results = [w.combine(ray.get(rs)) for w, rs in zip(pool.workers, refs)]
            t3 = time.perf_counter()
            result = aggregate(results)
            t4 = time.perf_counter()
            if i == 1:  # the first measured step: against the un-sharded executor at the same parameters
                expected = _unsharded(spec, published, coord.step)
                diff = max(
                    float((result.grads[k].double() - g.double()).norm() / g.double().norm().clamp_min(1e-30))
                    for k, g in expected.items()
                )
            coord.apply(result)
            t5 = time.perf_counter()
            timing = {
                "put": t1 - t0,
                "wait": t2 - t1,
                "gather": t3 - t2,
                "aggregate": t4 - t3,
                "optimizer": t5 - t4,
                "step": t5 - t0,
                "worker": max(r.data_s + r.compute_s for r in results),
            }
            if i and (best is None or timing["step"] < best["step"]):
                best = timing
    finally:
        pool.shutdown()
    assert best is not None and diff is not None
    coordinator = best["put"] + best["gather"] + best["aggregate"] + best["optimizer"]
    return {
        "nodes": len(nodes),
        "max_rel_diff_vs_unsharded": diff,
        "coordinator_fraction": round(coordinator / best["step"], 4),
        **{f"{k}_s": round(v, 4) for k, v in best.items()},
    }


def _recovery(groups: int, ranks: int, root: str) -> dict[str, Any]:
    import torch

    from metascale.cluster import checkpoint, faults
    from metascale.train import train

    runs = {}
    for name in ("clean", "rank-lost"):
        spec = job(f"bench-sharded-{name}", groups, ranks, root)
        if name == "rank-lost":
            os.environ[faults.FAULT] = f"exit:2:{groups - 1}:{ranks - 1}"
            os.environ[faults.ONCE] = f"{root}/fault-fired"
        t0 = time.perf_counter()
        try:
            out = train(spec)
        finally:
            os.environ.pop(faults.FAULT, None)
            os.environ.pop(faults.ONCE, None)
        _, state = checkpoint.load_latest(spec.path(spec.checkpoint.dir))
        runs[name] = {"params": state["params"], "s": time.perf_counter() - t0, "failures": out["worker_failures"]}
    clean, lost = runs["clean"], runs["rank-lost"]
    same = all(torch.equal(clean["params"][k], lost["params"][k]) for k in clean["params"])
    return {
        "recovered_from_rank_loss": bool(same and lost["failures"] >= 1 and os.path.exists(f"{root}/fault-fired")),
        "worker_failures_in_faulty_run": lost["failures"],
        "run_s": {"clean": round(clean["s"], 1), "rank_lost": round(lost["s"], 1)},
    }


def run(groups: int = 2, ranks: int = 2, steps: int = 3) -> dict[str, Any]:
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep every component on 127.0.0.1
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray.cluster_utils import Cluster

    with tempfile.TemporaryDirectory(prefix="metascale-bench-sharded-") as root:
        os.environ.setdefault("RAY_TMPDIR", root)  # Cluster's address file
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": ranks, "include_dashboard": False})
        try:
            for _ in range(max(groups - 1, 1)):
                cluster.add_node(num_cpus=ranks)
            cluster.wait_for_nodes()
            ray.init(address=cluster.address, logging_level="ERROR")
            timed = _timed_steps(job("bench-sharded", groups, ranks, root), steps)
            recovery = _recovery(groups, ranks, root)
        finally:
            ray.shutdown()
            cluster.shutdown()  # ends the processes it started, by pid
    return {
        "bench": "scaling-sharded",
        "rank_groups": groups,
        "ranks_per_group": ranks,
        "measured_steps": steps,
        "model": VIT,
        "algorithm": "fomaml, ZeRO-3, 1 inner step",
        "tasks_per_group": 2,
        "cpus": os.cpu_count(),
        **timed,
        **recovery,
    }
