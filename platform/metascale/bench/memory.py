"""`metascale bench memory`: what sharding + activation checkpointing buy for meta-training large ViTs.

1. zero3_param_memory_ratio: per-rank bytes of parameters, gradient partitions, meta-parameters and optimiser state
   (storages counted once; sharding/engine.py:param_bytes) after one FOMAML meta-step of the sharded runtime at
   ZeRO-3 with 2 ranks, over the same runtime with 1 rank (nothing to partition), same model, same run.
2. largest_backbone_params: the ViT family (dim 96, 3 heads, 32x32 images in 4x4 patches, 65 tokens) at growing depth;
   per-rank peak resident memory of one FOMAML meta-step on a 5-way 5-shot 15-query task, measured as the rise of
   the process's peak RSS (VmHWM, reset through /proc/self/clear_refs) over its RSS before the model is built.
   Without: metascale's un-sharded path (coordinator + worker in one process, cluster.address inline). With: the
   sharded runtime, ZeRO-3 over 2 ranks + per-block activation checkpointing (the larger rank counts). Peak memory
   is linear in depth (each block adds the same parameters and activations), so a line fitted through the measured
   depths (after one discarded warm-up measurement: first-use allocations) gives the largest depth under the per-rank budget; the fit's worst residual is reported with it.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from metascale.bench.peak import added_bytes, settle
from metascale.config import JobSpec
from metascale.models import build_model, count_params

DEPTHS = (2, 6, 10)
VIT = dict(name="vit", in_channels=1, image_size=32, patch_size=4, dim=96, heads=3)


def job(depth: int, sharded: bool, ranks: int = 2, checkpointing: bool = True) -> JobSpec:
    sharding = dict(engine="deepspeed", zero_stage=3, ranks=ranks, activation_checkpointing=checkpointing)
    return JobSpec.model_validate(dict(
        model={**VIT, "depth": depth},
        data=dict(source="synthetic", ways=5, shots=5, queries=15, image_size=32),
        algorithm=dict(name="fomaml", inner=dict(steps=1, lr=0.1)),
        outer=dict(meta_batch=1),
        cluster=dict(address="inline"),
        logging=dict(wandb=dict(mode="disabled")),
        **({"sharding": sharding} if sharded else {}),
    ))


# ------------------------------------------------------------------------------- run inside a rank
def measure_sharded(spec_json: dict[str, Any]) -> dict[str, float]:
    from metascale.data import build_task_source
    from metascale.sharding.engine import param_bytes
    from metascale.sharding.launch import RANK_STATE
    from metascale.sharding.worker import build_learner

    base = settle()
    spec = JobSpec.model_validate(spec_json)
    learner = build_learner(spec, RANK_STATE["rank"], RANK_STATE["world"])
    tasks = build_task_source(spec.data, "train", spec.seed).batch(0, [0]).tasks()
    t0 = time.perf_counter()
    learner.meta_step(0, tasks, [None])
    step_s = time.perf_counter() - t0
    peak = added_bytes(base) / 1024
    meta = list(learner.meta.values())
    state = [t for s in learner.optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim()]
    held = param_bytes(learner.engine, extra=meta + state + [p.grad for p in meta if p.grad is not None])
    del learner
    return {"peak_mib": peak / 1024, "state_bytes": held, "step_s": step_s}


def measure_unsharded(spec_json: dict[str, Any]) -> dict[str, float]:
    from metascale.cluster.coordinator import Coordinator
    from metascale.cluster.estimators import ESTIMATORS
    from metascale.cluster.pool import InlinePool

    base = settle()
    spec = JobSpec.model_validate(spec_json)
    coord, pool = Coordinator(spec), InlinePool(spec)
    t0 = time.perf_counter()
    coord.apply(ESTIMATORS["backprop"](pool, [[0]], 0, coord.published()))
    step_s = time.perf_counter() - t0
    peak = added_bytes(base) / 1024
    del coord, pool
    return {"peak_mib": peak / 1024, "step_s": step_s}


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


def run(budget_mib: float = 1024.0) -> dict[str, Any]:
    from metascale.sharding.launch import RankGroup  # glibc's defaults here: settle needs freed memory returned

    out: dict[str, Any] = {"bench": "memory", "budget_mib_per_rank": budget_mib, "vit": VIT, "depths": list(DEPTHS),
                           "episode": "5-way 5-shot 15-query, 32x32", "algorithm": "fomaml, 1 inner step",
                           "machine": "CPU, gloo", "threads_per_rank": 1}
    with RankGroup(1) as one:
        one.call(measure_unsharded, job(DEPTHS[0], False).model_dump(mode="json"))  # warm-up: first-use allocations
        plain = [one.call(measure_unsharded, job(d, False).model_dump(mode="json"))[0] for d in DEPTHS]
        single = one.call(measure_sharded, job(DEPTHS[-1], True, ranks=1).model_dump(mode="json"))[0]
    with RankGroup(2) as two:
        two.call(measure_sharded, job(DEPTHS[0], True).model_dump(mode="json"))  # warm-up, as above
        sharded = [max(two.call(measure_sharded, job(d, True).model_dump(mode="json")), key=lambda r: r["peak_mib"])
                   for d in DEPTHS]
    whole = single["state_bytes"]
    out["zero3_param_memory_ratio"] = round(sharded[-1]["state_bytes"] / whole, 3)
    out["param_state_bytes"] = {"ranks_1": whole, "zero3_ranks_2_per_rank": sharded[-1]["state_bytes"],
                                "depth": DEPTHS[-1]}
    a0, b0, r0 = _fit(list(DEPTHS), [m["peak_mib"] for m in plain])
    a1, b1, r1 = _fit(list(DEPTHS), [m["peak_mib"] for m in sharded])
    without, with_ = _largest(a0, b0, budget_mib), _largest(a1, b1, budget_mib)
    out["largest_backbone_params"] = {"without": without["params"], "with_zero3_2ranks_checkpointing": with_["params"]}
    out["largest_backbone_depth"] = {"without": without["depth"], "with_zero3_2ranks_checkpointing": with_["depth"]}
    out["largest_backbone_ratio"] = round(with_["params"] / max(without["params"], 1), 2)
    out["peak_mib"] = {"without": [round(m["peak_mib"], 1) for m in plain],
                       "with_zero3_2ranks_checkpointing": [round(m["peak_mib"], 1) for m in sharded]}
    out["fit_mib_per_block"] = {"without": round(b0, 2), "with_zero3_2ranks_checkpointing": round(b1, 2)}
    out["fit_worst_residual_mib"] = {"without": round(r0, 2), "with_zero3_2ranks_checkpointing": round(r1, 2)}
    out["step_s"] = {"without": [round(m["step_s"], 2) for m in plain],
                     "with_zero3_2ranks_checkpointing": [round(m["step_s"], 2) for m in sharded]}
    return out
