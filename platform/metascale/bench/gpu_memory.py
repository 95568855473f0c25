"""`metascale bench memory --device cuda`: the largest ViT meta-trainable with FOMAML on this one GPU, with and
without per-block activation checkpointing + bf16 autocast, and the meta-step throughput at those sizes.

On one GPU there is no second rank to partition over, so ZeRO buys nothing; the meta-parameters and the Adam state
live in the coordinator (host memory) in metascale's un-sharded runtime. The GPU holds what a worker holds
(cluster/replica.py): the model, the published meta-parameters, the adapted copy, gradients and activations, and that
is what is measured: the worker's computation for one 5-way 5-shot 15-query episode of 224x224x3 images, the
ViT-L/16 width (dim 1024, 16 heads, 197 tokens) at growing depth, peak = the CUDA allocator's high-water mark.
Peak memory is linear in depth, so a line through three measured depths predicts the largest depth under the card's
memory; that depth is then run (5% shallower after each out-of-memory) to confirm it, and its step time is reported.
"""

from __future__ import annotations

import gc
import time
from typing import Any

import torch

from metascale.algorithms import build_algorithm
from metascale.algorithms.executor import meta_gradient
from metascale.bench.memory import _fit
from metascale.config import JobSpec
from metascale.data import build_task_source
from metascale.models import build_model, count_params
from metascale.models.checkpointing import checkpointed_blocks

VIT = dict(name="vit", in_channels=3, image_size=224, patch_size=16, dim=1024, heads=16)
EPISODE = dict(source="synthetic", ways=5, shots=5, queries=15, image_size=224, channels=3, classes=16)
FIT_DEPTHS = {"plain": (2, 4, 8), "checkpointing_bf16": (4, 8, 16)}


def job(depth: int, lean: bool) -> JobSpec:
    return JobSpec.model_validate(
        dict(
            model={**VIT, "depth": depth},
            data=EPISODE,
            algorithm=dict(name="fomaml", inner=dict(steps=1, lr=0.01, autocast="bf16" if lean else "none")),
            outer=dict(meta_batch=1),
            cluster=dict(address="inline"),
            logging=dict(wandb=dict(mode="disabled")),
        )
    )


def _free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def measure(depth: int, lean: bool) -> dict[str, Any] | None:
    """One worker meta-step at `depth` (after a warm-up step): peak bytes and seconds, or None if it did not fit."""
    spec = job(depth, lean)
    _free()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    try:
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = build_model(spec.model, spec.data.ways)
        alg = build_algorithm(spec.algorithm, model)
        meta = {k: v.detach().clone() for k, v in model.named_parameters()}  # the published copy (worker._params)
        batch = build_task_source(spec.data, "train", 0).batch(0, [0]).to("cuda")
        times = []
        for _ in range(2):  # the first is the warm-up
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with checkpointed_blocks(lean):  # per block, recomputed with the adapted weights (models/checkpointing.py)
                grads = {k: g.cpu() for k, g in meta_gradient(alg, meta, batch, "per_task").grads.items()}
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        finite = all(bool(torch.isfinite(g).all()) for g in grads.values())
        params = count_params(model)
    except torch.OutOfMemoryError:
        return None
    finally:
        model = alg = meta = batch = grads = None  # noqa: F841  (drop the references before freeing)
        _free()
    return {
        "depth": depth,
        "params": params,
        "peak_gib": (torch.cuda.max_memory_allocated() - before) / 2**30,
        "step_s": times[-1],
        "grads_finite": finite,
    }


def largest(lean: bool, capacity_gib: float) -> dict[str, Any]:
    depths = FIT_DEPTHS["checkpointing_bf16" if lean else "plain"]
    measure(depths[0], lean)  # warm-up: kernels, cuBLAS handles
    points = [measure(d, lean) for d in depths]
    a, b, resid = _fit(list(depths), [p["peak_gib"] for p in points])
    depth = int((capacity_gib - a) // b)
    predicted = depth
    while depth > depths[-1]:
        found = measure(depth, lean)
        if found is not None:
            break
        depth = int(depth * 0.95)
    return {
        "fit_points": points,
        "fit_gib_per_block": round(b, 4),
        "fit_intercept_gib": round(a, 3),
        "fit_worst_residual_gib": round(resid, 4),
        "predicted_depth": predicted,
        "largest": found,
    }


def run() -> dict[str, Any]:
    _, total = torch.cuda.mem_get_info()
    capacity = total / 2**30 * 0.97  # a margin for the allocator's fragmentation and the CUDA context
    out: dict[str, Any] = {
        "bench": "memory",
        "device": torch.cuda.get_device_name(),
        "capacity_gib": round(capacity, 2),
        "vit": VIT,
        "episode": "5-way 5-shot 15-query, 224x224x3",
        "algorithm": "fomaml, 1 inner step",
        "without": "fp32, no activation checkpointing",
        "with": "per-block activation checkpointing + bf16 autocast",
    }
    plain, lean = largest(False, capacity), largest(True, capacity)
    out["plain"], out["checkpointing_bf16"] = plain, lean
    p, q = plain["largest"] or {}, lean["largest"] or {}
    out["largest_backbone_params"] = {"without": p.get("params"), "with": q.get("params")}
    out["largest_backbone_ratio"] = round(q["params"] / p["params"], 2) if p and q else None
    out["step_s_at_largest"] = {"without": p.get("step_s"), "with": q.get("step_s")}
    return out
