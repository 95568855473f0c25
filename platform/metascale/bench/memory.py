"""`metascale bench memory`: what sharding + activation checkpointing buy for meta-training large ViTs, and what
the coordinator holds for a 1B-parameter model.

1. zero3_param_memory_ratio: per-rank bytes of parameter, gradient-partition and engine-optimiser storage
   (sharding/engine.py:param_bytes, storages counted once) after one FOMAML meta-gradient item of the runtime's own
   rank (sharding/rank.py) at ZeRO-3 with 2 ranks, over the same with 1 rank (nothing to partition).
2. largest_backbone_params: the ViT family (dim 96, 3 heads, 32x32 images in 4x4 patches, 65 tokens) at growing
   depth; per-process peak resident memory of one FOMAML meta-gradient item on a 5-way 5-shot 15-query task,
   measured as the rise of the process's peak RSS (VmHWM, reset through /proc/self/clear_refs) over its RSS before
   the worker is built, after one discarded warm-up item. Without: a replica (cluster/replica.py). With: a rank of
   a ZeRO-3 group of 2 + per-block activation checkpointing (the larger rank). Each runs in a Ray actor of its own,
   with glibc told to return freed memory at once (bench/peak.py), so the resident set follows the live tensors.
   Peak memory is linear in depth; a line fitted through the measured depths gives the largest depth under the
   per-process budget, with the fit's worst residual.
4. mixed_mode_memory_ratio / mixed_mode_time_ratio: peak memory and time of one task's exact second-order MAML
   meta-gradient (10 inner steps, the worse of the 197-token ViT and a half-width ResNet-12 on 5-way 5-shot 84x84:
   mixed_mode_ratios_episode names the episode; the 50-token ViT beside them),
   `inner.differentiation: mixed` (its fastest stride and support chunking within a 0.3 memory ratio, else its
   lowest peak) over the best reverse-mode path; and the same on 5-way 1-shot 32x32 (ResNet-12 and ViT, mixed_mode) and 5-shot 32x32 ViT
   (mixed_mode_larger_support) episodes (bench/mixed_mode.py; without the 84x84 rows, `--no-mixed-mode-84`, the
   headline is the 1-shot 32x32 episode's).
3. coordinator_bytes_per_param: the coordinator (cluster/coordinator.py) for an MLP of `coordinator_params`
   parameters: the peak rise over building it, publishing the parameters (the numpy views the object store copies)
   and one Adam step from a whole meta-gradient, in a fresh process. The meta-optimiser lives there for every job.
"""

from __future__ import annotations

from typing import Any

import torch

from metascale.config import JobSpec
from metascale.extras import check, require
from metascale.models import build_model, count_params

DEPTHS = (2, 6, 10)
VIT = dict(name="vit", in_channels=1, image_size=32, patch_size=4, dim=96, heads=3)
# glibc: every allocation over 64 KiB gets its own mmap and freed memory goes back at once (bench/peak.py)
MEASURING_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "OMP_NUM_THREADS": "1"}


def job(depth: int, sharded: bool, ranks: int = 2, checkpointing: bool = True) -> JobSpec:
    sharding = dict(engine="deepspeed", zero_stage=3, ranks=ranks, activation_checkpointing=checkpointing)
    return JobSpec.model_validate(
        dict(
            model={**VIT, "depth": depth},
            data=dict(source="synthetic", ways=5, shots=5, queries=15, image_size=32),
            algorithm=dict(name="fomaml", inner=dict(steps=1, lr=0.1)),
            outer=dict(meta_batch=1),
            logging=dict(wandb=dict(mode="disabled")),
            **({"sharding": sharding} if sharded else {}),
        )
    )


class Probe:
    """One worker process of the runtime (a replica, or one rank of a group) with its memory measured."""

    def __init__(self, spec_json: dict[str, Any], rank: int, world: int):
        from metascale.bench.peak import settle

        self.spec_json, self.rank, self.world = spec_json, rank, world
        self.sharded = JobSpec.model_validate(spec_json).sharding.engine == "deepspeed"
        require("deepspeed")  # imported before the base line on both sides: library memory is not the model's

        self.base = settle()
        self.worker: Any = None

    def _rank(self) -> Any:
        from metascale.sharding.rank import Rank

        if self.worker is None:
            self.worker = Rank(self.spec_json, 0, self.rank, self.world)
        return self.worker

    def endpoint(self) -> tuple[str, int]:
        return self._rank().endpoint(True)

    def setup(self, endpoint: tuple[str, int] | None) -> None:
        if self.sharded:  # every rank on this machine, on CPU: gloo
            self._rank().setup(endpoint, 600.0, *[("local", [])] * self.world)
        else:
            from metascale.cluster.replica import Replica

            self.worker = Replica(self.spec_json)

    def step(self, params: dict[str, Any]) -> dict[str, float]:
        from metascale.bench.peak import added_bytes
        from metascale.cluster.messages import WorkItem

        item = WorkItem("meta_gradient", 0, (0,))
        self.worker.run(item, params)  # warm-up: first-use allocations
        result = self.worker.run(item, params)
        out = {"peak_mib": added_bytes(self.base) / 2**20, "step_s": result.data_s + result.compute_s}
        if self.sharded:
            out["state_bytes"] = self.worker.held()["state_bytes"]
        return out


def _measure(spec: JobSpec, world: int) -> dict[str, float]:
    """The largest process's figures for one item of `spec` on `world` fresh processes."""
    import ray

    from metascale.cluster.coordinator import Coordinator

    probe = ray.remote(Probe).options(num_cpus=0.5, runtime_env={"env_vars": MEASURING_ENV})
    actors = [probe.remote(spec.model_dump(mode="json"), r, world) for r in range(world)]
    try:
        endpoint = actors[0].endpoint.remote() if spec.sharding.engine == "deepspeed" else None
        ray.get([a.setup.remote(endpoint) for a in actors], timeout=900)
        params = ray.put(Coordinator(spec).published())
        results = ray.get([a.step.remote(params) for a in actors], timeout=900)
    finally:
        for a in actors:
            ray.kill(a)
    return max(results, key=lambda r: r["peak_mib"])


def coordinator_peak(params: int) -> float:
    """Runs in a fresh process (bench/peak.py): bytes the coordinator of an MLP of ~`params` parameters adds at its
    peak while it is built, publishes its parameters and applies one Adam step."""
    from metascale.bench.peak import added_bytes, settle
    from metascale.bench.scaling import job as mlp_job
    from metascale.cluster.coordinator import Coordinator, StepResult

    torch.set_num_threads(1)
    base = settle()
    coord = Coordinator(mlp_job(params, 1, 1, "coordinator"))
    published = coord.published()  # numpy views of the parameters (ray.put copies them into the object store)
    grads = {k: torch.full_like(p, 1e-3) for k, p in coord.params.items()}
    coord.apply(StepResult(grads, 1, {}, {0: 0.0}, 0.0))
    del published
    return float(added_bytes(base))


# ---------------------------------------------------------------------------------------- driver
def _fit(depths: list[int], peaks: list[float]) -> tuple[float, float, float]:
    """Least-squares line peak = a + b * depth, and its worst residual."""
    x, y = torch.tensor(depths, dtype=torch.float64), torch.tensor(peaks, dtype=torch.float64)
    b = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())
    a = float(y.mean()) - b * float(x.mean())
    return a, b, float((y - (a + b * x)).abs().max())


def _largest(a: float, b: float, budget_mib: float) -> dict[str, Any]:
    depth = int((budget_mib - a) // b)
    params = count_params(build_model(job(max(depth, 1), False).model, 5)) if depth >= 1 else 0
    return {"depth": depth, "params": params}


def run(
    budget_mib: float = 1024.0, coordinator_params: int = 1_000_000_000, mixed_mode_84: bool = True
) -> dict[str, Any]:
    import os

    check("deepspeed")  # half of the comparison is ZeRO-3 ranks

    import ray

    from metascale.bench.peak import in_fresh_process

    out: dict[str, Any] = {
        "bench": "memory",
        "budget_mib_per_process": budget_mib,
        "vit": VIT,
        "depths": list(DEPTHS),
        "episode": "5-way 5-shot 15-query, 32x32",
        "algorithm": "fomaml, 1 inner step",
        "machine": "CPU, gloo",
        "threads_per_process": 1,
    }
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, 2), include_dashboard=False, logging_level="ERROR")
    try:
        _measure(job(DEPTHS[0], False), 1)  # warm-up of the machine (page cache of the libraries)
        plain = [_measure(job(d, False), 1) for d in DEPTHS]
        single = _measure(job(DEPTHS[-1], True, ranks=1), 1)
        sharded = [_measure(job(d, True), 2) for d in DEPTHS]
    finally:
        ray.shutdown()
    whole = single["state_bytes"]
    out["zero3_param_memory_ratio"] = round(sharded[-1]["state_bytes"] / whole, 3)
    out["param_state_bytes"] = {
        "ranks_1": whole,
        "zero3_ranks_2_per_rank": sharded[-1]["state_bytes"],
        "depth": DEPTHS[-1],
    }
    a0, b0, r0 = _fit(list(DEPTHS), [m["peak_mib"] for m in plain])
    a1, b1, r1 = _fit(list(DEPTHS), [m["peak_mib"] for m in sharded])
    without, with_ = _largest(a0, b0, budget_mib), _largest(a1, b1, budget_mib)
    out["largest_backbone_params"] = {"without": without["params"], "with_zero3_2ranks_checkpointing": with_["params"]}
    out["largest_backbone_depth"] = {"without": without["depth"], "with_zero3_2ranks_checkpointing": with_["depth"]}
    out["largest_backbone_ratio"] = round(with_["params"] / max(without["params"], 1), 2)
    out["peak_mib"] = {
        "without": [round(m["peak_mib"], 1) for m in plain],
        "with_zero3_2ranks_checkpointing": [round(m["peak_mib"], 1) for m in sharded],
    }
    out["fit_mib_per_block"] = {"without": round(b0, 2), "with_zero3_2ranks_checkpointing": round(b1, 2)}
    out["fit_worst_residual_mib"] = {"without": round(r0, 2), "with_zero3_2ranks_checkpointing": round(r1, 2)}
    out["step_s"] = {
        "without": [round(m["step_s"], 2) for m in plain],
        "with_zero3_2ranks_checkpointing": [round(m["step_s"], 2) for m in sharded],
    }
    from metascale.bench.mixed_mode import run as mixed_mode

    out.update(mixed_mode(skip_mini=not mixed_mode_84))  # mixed_mode_memory_ratio, mixed_mode_time_ratio, rows
    if coordinator_params:
        peak = in_fresh_process("metascale.bench.memory:coordinator_peak", params=coordinator_params)
        from metascale.bench.scaling import job as mlp_job

        n = count_params(build_model(mlp_job(coordinator_params, 1, 1, "coordinator").model, 1))
        out["coordinator"] = {
            "params": n,
            "peak_bytes": int(peak),
            "bytes_per_param": round(peak / n, 2),
            "what": "parameters, Adam state, the applied meta-gradient, published numpy views",
        }
    return out
