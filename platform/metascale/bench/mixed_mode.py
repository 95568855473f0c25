"""Mixed-mode vs reverse-mode second-order meta-gradients (`inner.differentiation`): peak memory and time of one
task's exact MAML meta-gradient, 10 inner steps, float32, on ResNet-12 and the ViT (part of `metascale bench memory`),
for a 5-way 1-shot episode (the headline ratios; weight copies dominate both modes' peaks there) and, on the ViT, a
5-shot one (25 support examples, whose activations weigh more: where block-level recomputation pays).

Reverse mode's best path is the lowest peak of its memory options (nothing recomputed; `checkpoint: all`: every
inner step and the query pass block by block; and the query pass in chunks on top). Mixed mode runs with the same
query-pass option as that best, so the two differ only in how they differentiate through the inner loop, keeping
every step's weights (`mixed_stride: 1`) or every ~sqrt(K)-th (the rest recomputed); its lower peak is compared.
Peak: the rise of the resident set in a fresh process (bench/peak.py), after a warm-up call. Time: best of
`repeats` calls, one thread, the two interleaved; the same calls check that both modes give the same meta-gradient.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from pydantic import TypeAdapter

from metascale.algorithms import build_algorithm
from metascale.algorithms.executor import meta_gradient
from metascale.bench.peak import added_bytes, in_fresh_process, settle
from metascale.config import AlgorithmSpec, InnerLoopSpec, ModelSpec, ResNet12Spec, SyntheticImagesData, ViTSpec
from metascale.data import build_task_source
from metascale.models import build_model

STEPS = 10
EPISODE = dict(ways=5, shots=1, queries=15, image_size=32, channels=3)
LARGER_EPISODE = dict(EPISODE, shots=5)  # 25 support examples: activations weigh more against the weight copies
MODELS: dict[str, dict[str, Any]] = {
    "resnet12": ResNet12Spec(in_channels=3, channels=[32, 64, 128, 256], image_size=32).model_dump(),
    "vit": ViTSpec(in_channels=3, image_size=32, patch_size=4, dim=96, depth=4, heads=3).model_dump(),
}
# reverse mode's memory options: (inner.checkpoint, inner.query_chunk)
REVERSE = {"plain": ("none", None), "blocks": ("all", None), "chunked": ("all", 5)}


def _setup(model: dict, episode: dict, steps: int, mode: str, checkpoint: str, chunk: int | None, stride: int = 1):
    torch.manual_seed(0)
    net = build_model(TypeAdapter(ModelSpec).validate_python(model), episode["ways"])
    inner = InnerLoopSpec(
        steps=steps, lr=0.1, checkpoint=checkpoint, query_chunk=chunk, differentiation=mode, mixed_stride=stride
    )
    alg = build_algorithm(AlgorithmSpec(name="maml", inner=inner), net)
    batch = build_task_source(SyntheticImagesData(**episode), "train", 0).batch(0, range(1))
    return alg, alg.init(dict(net.named_parameters())), batch


def task_peak_bytes(**setup: Any) -> int:
    """Runs in a fresh process: what one task's meta-gradient adds to the peak resident set (after a warm-up)."""
    torch.set_num_threads(1)
    alg, meta, batch = _setup(**setup)
    meta_gradient(alg, meta, batch)
    base = settle()
    meta_gradient(alg, meta, batch)
    return added_bytes(base)


def _times(setups: dict[str, dict[str, Any]], repeats: int) -> tuple[dict[str, float], float]:
    """Best time of each setup's meta-gradient; the largest relative difference of their meta-gradients."""
    torch.set_num_threads(1)
    runs = {name: _setup(**s) for name, s in setups.items()}
    best, grads = {name: float("inf") for name in runs}, {}
    for _ in range(repeats + 1):  # the first round warms up
        for name, (alg, meta, batch) in runs.items():
            t0 = time.perf_counter()
            grads[name] = meta_gradient(alg, meta, batch).grads
            best[name] = min(best[name], time.perf_counter() - t0)
    ref = grads.pop("reverse")
    norm = sum(float((g**2).sum()) for g in ref.values()) ** 0.5
    diff = max(sum(float(((g[k] - ref[k]) ** 2).sum()) for k in ref) ** 0.5 / norm for g in grads.values())
    return best, diff


def _rows(models: dict[str, dict], episode: dict, steps: int, repeats: int) -> dict[str, dict[str, Any]]:
    """Per model: every reverse option's peak, mixed mode's peaks and both times."""
    strides, rows = sorted({1, math.ceil(math.sqrt(steps))}), {}
    for model, spec in models.items():
        base = dict(model=spec, episode=episode, steps=steps)
        reverse = {k: int(in_fresh_process(f"{__name__}:task_peak_bytes", **base, mode="reverse", checkpoint=o[0],
                                           chunk=o[1])) for k, o in REVERSE.items()}  # fmt: skip
        best = min(reverse, key=reverse.__getitem__)
        query = dict(checkpoint=REVERSE[best][0], chunk=REVERSE[best][1])
        mixed = {s: int(in_fresh_process(f"{__name__}:task_peak_bytes", **base, **query, mode="mixed", stride=s))
                 for s in strides}  # fmt: skip
        stride = min(mixed, key=mixed.__getitem__)
        times, diff = _times(
            {
                "reverse": {**base, **query, "mode": "reverse"},
                "mixed": {**base, **query, "mode": "mixed", "stride": stride},
            },
            repeats,
        )
        rows[model] = {
            "reverse_peak_bytes": reverse,
            "best_reverse": best,
            "mixed_peak_bytes_by_stride": {str(s): b for s, b in mixed.items()},
            "mixed_stride": stride,
            "memory_ratio": round(mixed[stride] / reverse[best], 3),
            "reverse_s": round(times["reverse"], 3),
            "mixed_s": round(times["mixed"], 3),
            "time_ratio": round(times["mixed"] / times["reverse"], 3),
            "meta_gradient_relative_difference": diff,
        }
    return rows


def _episode(e: dict) -> str:
    return f"{e['ways']}-way {e['shots']}-shot {e['queries']}-query {e['image_size']}x{e['image_size']}x{e['channels']}"


def run(
    repeats: int = 2,
    steps: int = STEPS,
    models: dict[str, dict] | None = None,
    episode: dict | None = None,
    larger: tuple[dict, dict[str, dict]] | None = None,
) -> dict[str, Any]:
    """The headline ratios (the worse model) on `episode`, where weight copies dominate; and the same rows on the
    `larger` (episode, models), a support set whose activations weigh more (the ViT only by default: ResNet-12's
    rows there would take the bench past its time budget)."""
    episode = episode or EPISODE
    rows = _rows(models or MODELS, episode, steps, repeats)
    what = (f"one task's exact MAML meta-gradient, {steps} inner steps, {{}}, float32, CPU, 1 thread; ratios are "
            "mixed (its lower-peak stride) / the best reverse path")  # fmt: skip
    out = {
        "mixed_mode_memory_ratio": max(r["memory_ratio"] for r in rows.values()),
        "mixed_mode_time_ratio": max(r["time_ratio"] for r in rows.values()),
        "mixed_mode_ratios_episode": _episode(episode),
        "mixed_mode": {"what": what.format(_episode(episode)), **rows},
    }
    larger_episode, larger_models = larger or (LARGER_EPISODE, {"vit": MODELS["vit"]})
    rows = _rows(larger_models, larger_episode, steps, repeats)
    out["mixed_mode_larger_support"] = {
        "what": what.format(_episode(larger_episode)),
        "memory_ratio": max(r["memory_ratio"] for r in rows.values()),
        "time_ratio": max(r["time_ratio"] for r in rows.values()),
        **rows,
    }
    return out
