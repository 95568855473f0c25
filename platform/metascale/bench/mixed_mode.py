"""Mixed-mode vs reverse-mode second-order meta-gradients (`inner.differentiation`): peak memory and time of one
task's exact MAML meta-gradient, 10 inner steps, float32, on ResNet-12 and the ViT (part of `metascale bench memory`).

Reverse mode's best path is the lowest peak of its memory options (nothing recomputed; `checkpoint: all`: every
inner step and the query pass block by block; and the query pass in chunks on top); mixed mode runs with the same
query-pass option as that best, so the two differ only in how they differentiate through the inner loop. Peak: the
rise of the resident set in a fresh process (bench/peak.py), after a warm-up call. Time: best of `repeats` calls,
one thread, the two interleaved.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from metascale.algorithms import build_algorithm
from metascale.algorithms.executor import meta_gradient
from metascale.bench.peak import added_bytes, in_fresh_process, settle
from metascale.config import AlgorithmSpec, InnerLoopSpec, ResNet12Spec, SyntheticImagesData, ViTSpec
from metascale.data import build_task_source
from metascale.models import build_model

STEPS = 10
EPISODE = dict(ways=5, shots=1, queries=15, image_size=32, channels=3)
MODELS: dict[str, Any] = {
    "resnet12": ResNet12Spec(in_channels=3, channels=[32, 64, 128, 256], image_size=32),
    "vit": ViTSpec(in_channels=3, image_size=32, patch_size=4, dim=96, depth=4, heads=3),
}
# reverse mode's memory options: (inner.checkpoint, inner.query_chunk)
REVERSE = {"plain": ("none", None), "blocks": ("all", None), "chunked": ("all", 5)}


def _setup(model: str, differentiation: str, checkpoint: str, query_chunk: int | None):
    torch.manual_seed(0)
    net = build_model(MODELS[model], EPISODE["ways"])
    inner = InnerLoopSpec(
        steps=STEPS, lr=0.1, checkpoint=checkpoint, query_chunk=query_chunk, differentiation=differentiation
    )
    alg = build_algorithm(AlgorithmSpec(name="maml", inner=inner), net)
    batch = build_task_source(SyntheticImagesData(**EPISODE), "train", 0).batch(0, range(1))
    return alg, alg.init(dict(net.named_parameters())), batch


def task_peak_bytes(model: str, differentiation: str, checkpoint: str, query_chunk: int | None) -> int:
    """Runs in a fresh process: what one task's meta-gradient adds to the peak resident set (after a warm-up)."""
    torch.set_num_threads(1)
    alg, meta, batch = _setup(model, differentiation, checkpoint, query_chunk)
    meta_gradient(alg, meta, batch)
    base = settle()
    meta_gradient(alg, meta, batch)
    return added_bytes(base)


def _peak(model: str, differentiation: str, option: tuple[str, int | None]) -> int:
    return int(
        in_fresh_process(
            f"{__name__}:task_peak_bytes",
            model=model,
            differentiation=differentiation,
            checkpoint=option[0],
            query_chunk=option[1],
        )
    )


def _times(model: str, option: tuple[str, int | None], repeats: int) -> dict[str, float]:
    torch.set_num_threads(1)
    runs = {mode: _setup(model, mode, *option) for mode in ("reverse", "mixed")}
    best = {mode: float("inf") for mode in runs}
    for _ in range(repeats + 1):  # the first round warms up
        for mode, (alg, meta, batch) in runs.items():
            t0 = time.perf_counter()
            meta_gradient(alg, meta, batch)
            best[mode] = min(best[mode], time.perf_counter() - t0)
    return best


def run(repeats: int = 2) -> dict[str, Any]:
    """Per model: every reverse option's peak, mixed mode's peak and both times; the worst ratio over the models."""
    rows: dict[str, Any] = {}
    for model in MODELS:
        reverse = {name: _peak(model, "reverse", option) for name, option in REVERSE.items()}
        best = min(reverse, key=reverse.__getitem__)
        mixed = _peak(model, "mixed", REVERSE[best])
        times = _times(model, REVERSE[best], repeats)
        rows[model] = {
            "reverse_peak_bytes": reverse,
            "best_reverse": best,
            "mixed_peak_bytes": mixed,
            "memory_ratio": round(mixed / reverse[best], 3),
            "reverse_s": round(times["reverse"], 3),
            "mixed_s": round(times["mixed"], 3),
            "time_ratio": round(times["mixed"] / times["reverse"], 3),
        }
    return {
        "mixed_mode_memory_ratio": max(r["memory_ratio"] for r in rows.values()),
        "mixed_mode_time_ratio": max(r["time_ratio"] for r in rows.values()),
        "mixed_mode": {
            "what": f"one task's exact MAML meta-gradient, {STEPS} inner steps, 5-way 1-shot 15-query "
            "32x32x3, float32, CPU, 1 thread; ratios are mixed / the best reverse path",
            **rows,
        },
    }
