"""Mixed-mode vs reverse-mode second-order meta-gradients (`inner.differentiation`): peak memory and time of one
task's exact MAML meta-gradient, 10 inner steps, float32, on ResNet-12 and the ViT (part of `metascale bench memory`),
for a 5-way 1-shot 32x32 episode (weight copies dominate both modes' peaks there), on the ViT a 5-shot 32x32 one (25
support examples, whose activations weigh more), and the standard 5-way 5-shot 15-query 84x84 episode (miniImageNet's
size; the headline ratios; by default the ViT in 197 tokens and a half-width ResNet-12, and the ViT in 50 tokens
beside them), where a task's activations dominate: the regime block-level recomputation is for.

Reverse mode's best path is the lowest peak of its memory options (nothing recomputed; `checkpoint: all`: every
inner step and the query pass block by block; and the query pass in chunks on top); where two options' peaks tie
(within PEAK_TIE), times are against the faster. Mixed mode runs with the same query-pass option as that best (at
84x84 with its lowest-memory one, the query pass in chunks), keeping every step's weights (`mixed_stride: 1`) or every
~sqrt(K)-th (the rest recomputed), and at 84x84 also with its support products 5 examples at a time
(`support_chunk`; on ResNet-12 3 where its maps are largest, block by block with explicit batch statistics), and, on
models without batch statistics, 3 at a time over the whole model (`mixed_blocks: false`: no block recomputation).
At 32x32 its lowest peak is compared; at 84x84 its fastest configuration within the memory target, else its lowest
peak (every configuration's figures are in the row). Peak: the rise of the resident set in a
fresh process (bench/peak.py), after a warm-up call. Time: CPU seconds of the one thread (less sensitive than wall
time to other jobs on the machine), the best of `repeats` calls, the configurations taking turns in the bench's own
process, their meta-gradients compared.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
import time
from typing import Any

import torch
from pydantic import TypeAdapter

from metascale.algorithms import build_algorithm
from metascale.algorithms.executor import meta_gradient
from metascale.bench.peak import added_bytes, in_fresh_process, settle
from metascale.config import AlgorithmSpec, InnerLoopSpec, ModelSpec, ResNet12Spec, SyntheticImagesData, ViTSpec
from metascale.config.sections import BLOCK_NORM_MODELS, PER_EXAMPLE_MODELS
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
# Reverse's paths whose peak is within this fraction of its lowest count as its best path alike, and the time ratio
# is against the fastest of them: the query pass in chunks barely moves reverse's peak (its inner double backward sets
# it: 512.5 against 512.6 MB on the 84x84 ResNet-12) but costs it time (62.45 against 55.17 CPU s at 10 steps,
# docs/benchmarks.md), which nobody would pay for 0.1 MB
PEAK_TIE = 0.02
# the standard few-shot episode (miniImageNet's image size), where a task's activations outweigh the weight copies
MINI_EPISODE = dict(ways=5, shots=5, queries=15, image_size=84, channels=3)
MINI_MODELS: dict[str, dict[str, Any]] = {
    # 6-pixel patches: 14 x 14 + the class token = 197 tokens, ViT-B/16's count at 224x224
    "vit": ViTSpec(in_channels=3, image_size=84, patch_size=6, dim=96, depth=4, heads=3).model_dump(),
    # half the standard widths (32-64-128-256, as at 32x32): at those a reverse meta-gradient took 18.2 CPU s at 1
    # inner step and 22.9 at 2 (~4.7 s a step after a first call's ~13 s), one 10-step configuration over 148 CPU s
    # on a loaded machine, so the row's four would add ~15-20 CPU minutes to the bench; at these widths 8.7 and 11.1 s
    # (~2.4 s a step), and the four take ~7-10 CPU minutes (docs/benchmarks.md). With support chunks its mixed mode
    # holds the whole support set's block boundaries (batch norm needs every example) and one chunk's product
    "resnet12": ResNet12Spec(in_channels=3, channels=[16, 32, 64, 128], image_size=84).model_dump(),
}
# the same ViT in 12-pixel patches (50 tokens): its ops are so small that per-op cost, paid once per support chunk,
# sets mixed mode's time (docs/benchmarks.md); reported beside the headline, not in it
FEW_TOKEN_MODELS: dict[str, dict[str, Any]] = {
    "vit_50_tokens": ViTSpec(in_channels=3, image_size=84, patch_size=12, dim=96, depth=4, heads=3).model_dump(),
}
# the 84x84 rows' mixed mode also computes its support products block by block this many examples at a time
# (`inner.support_chunk`): one chunk's activations instead of the 25 support examples'. ResNet-12 takes 3: since its
# parts are cut before their norms (models/resnet12.py), its last part holds two more maps than before, and in chunks
# of 5 / 4 / 3 its peak is 168.3 / 154.4 / 149.7 MB at 10 steps against reverse's 512.5 (docs/benchmarks.md)
SUPPORT_CHUNK = {"vit": 5, "resnet12": 3}
# ... and, on those models, over the whole model (`inner.mixed_blocks: false`: no block recomputation, the faster) this
# many at a time: a whole-model product holds every block's activations and tangents, ~32 MB per example on the
# 197-token ViT (peaks 839.8 MB for the 25 support examples at once, above reverse's 519.8; in chunks of 5 / 3 / 2:
# 194.6 / 130.2 / 97.8 MB), and smaller chunks cost time (best of 4: 1.08x reverse's in chunks of 3, 1.18x of 2)
WHOLE_MODEL_CHUNK = 3
# the memory target: the 84x84 rows report mixed mode's fastest configuration within it (a user's choice)
MEMORY_TARGET = 0.3
# The inner learning rate. At 0.1 the 84x84 ResNet-12's 10-step inner loop is chaotic (support loss 1.72, 2.11, 3.55,
# 3.02, 1.72, 1.11, 5.41, ...); at 0.01 it falls smoothly (1.72 to 0.55, float32's losses equal to float64's to 3
# decimals). Its float32 second-order meta-gradient stays rounding-bound even so (0.41 from float64's at 0.1, 0.21 at
# 0.01, reverse mode), so any change of summation order (support chunks) moves it by as much; in float64 chunks equal
# reverse (5.8e-15). The rows' memory and time do not depend on the rate (the same ops).
INNER_LR = 0.01


def _setup(
    model: dict,
    episode: dict,
    steps: int,
    mode: str,
    checkpoint: str,
    chunk: int | None,
    stride: int = 1,
    support_chunk: int | None = None,
    blocks: bool = True,
):
    torch.manual_seed(0)  # the same weights and episode in every process: the meta-gradients can be compared
    net = build_model(TypeAdapter(ModelSpec).validate_python(model), episode["ways"])
    inner = InnerLoopSpec(
        steps=steps,
        lr=INNER_LR,
        checkpoint=checkpoint,
        query_chunk=chunk,
        differentiation=mode,
        mixed_stride=stride,
        support_chunk=support_chunk,
        mixed_blocks=blocks,
    )
    alg = build_algorithm(AlgorithmSpec(name="maml", inner=inner), net)
    batch = build_task_source(SyntheticImagesData(**episode), "train", 0).batch(0, range(1))
    return alg, alg.init(dict(net.named_parameters())), batch


def task_peak(warmup_steps: int | None = None, **setup: Any) -> int:
    """Runs in a fresh process: what one task's meta-gradient adds to the peak resident set, after a warm-up: the
    same call, or with `warmup_steps` a call on the same shapes with that many inner steps (the same kernels, a
    fraction of the time: for calls that take many seconds)."""
    torch.set_num_threads(1)
    alg, meta, batch = _setup(**(setup if warmup_steps is None else {**setup, "steps": warmup_steps}))
    meta_gradient(alg, meta, batch)
    if warmup_steps is not None:
        del alg
        alg, meta, batch = _setup(**setup)
    base = settle()
    meta_gradient(alg, meta, batch)
    return added_bytes(base)


def _relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    norm = sum(float((t**2).sum()) for t in b.values()) ** 0.5
    return sum(float(((a[k] - b[k]) ** 2).sum()) for k in b) ** 0.5 / norm


def _times(setups: dict[str, dict[str, Any]], repeats: int) -> tuple[dict[str, float], float]:
    """Best time of each setup's meta-gradient, in this process (the allocator users run: the peaks' fresh processes
    map and unmap every allocation over 64 KiB, whose page faults would be timed too); the largest relative
    difference of the others' meta-gradients from the first's. The setups take turns, so load on the machine falls on
    all of them alike; a first round warms up (kernels, and glibc's allocator, whose mmap threshold grows as it
    frees)."""
    torch.set_num_threads(1)
    runs = {name: _setup(**s) for name, s in setups.items()}
    best, grads = {name: float("inf") for name in runs}, {}
    for i in range(repeats + 1):
        for name, (alg, meta, batch) in runs.items():
            t0 = time.process_time()
            grads[name] = meta_gradient(alg, meta, batch).grads
            if i:
                best[name] = min(best[name], time.process_time() - t0)
    ref = grads.pop(next(iter(setups)))
    return best, max(_relative_difference(g, ref) for g in grads.values())


def _best_reverse(peaks: dict[str, int]) -> tuple[str, list[str]]:
    """Reverse's lowest-peak path, and its paths within PEAK_TIE of that peak (the lowest first): the ones timed."""
    best = min(peaks, key=peaks.__getitem__)
    return best, [best, *(k for k in peaks if k != best and peaks[k] <= (1 + PEAK_TIE) * peaks[best])]


def _reverse_times(times: dict[str, float], paths: list[str]) -> dict[str, Any]:
    """The row's reverse time: the fastest of its best paths'."""
    by_path = {k: round(times[f"reverse_{k}"], 3) for k in paths}
    return {"reverse_s_by_path": by_path, "timed_reverse": min(by_path, key=by_path.__getitem__),
            "reverse_s": min(by_path.values())}  # fmt: skip


def _rows(models: dict[str, dict], episode: dict, steps: int, repeats: int) -> dict[str, dict[str, Any]]:
    """Per model: every reverse option's peak, mixed mode's peaks and both times."""
    strides, rows = sorted({1, math.ceil(math.sqrt(steps))}), {}
    for model, spec in models.items():
        base = dict(model=spec, episode=episode, steps=steps)
        reverse = {k: int(in_fresh_process(f"{__name__}:task_peak", **base, mode="reverse", checkpoint=o[0],
                                           chunk=o[1])) for k, o in REVERSE.items()}  # fmt: skip
        best, timed = _best_reverse(reverse)
        query = dict(checkpoint=REVERSE[best][0], chunk=REVERSE[best][1])
        mixed = {s: int(in_fresh_process(f"{__name__}:task_peak", **base, **query, mode="mixed", stride=s))
                 for s in strides}  # fmt: skip
        stride = min(mixed, key=mixed.__getitem__)
        paths = {
            f"reverse_{k}": dict(base, mode="reverse", checkpoint=REVERSE[k][0], chunk=REVERSE[k][1]) for k in timed
        }
        times, diff = _times({**paths, "mixed": {**base, **query, "mode": "mixed", "stride": stride}}, repeats)
        reverse_times = _reverse_times(times, timed)
        rows[model] = {
            "reverse_peak_bytes": reverse,
            "best_reverse": best,
            "mixed_peak_bytes_by_stride": {str(s): b for s, b in mixed.items()},
            "mixed_stride": stride,
            "memory_ratio": round(mixed[stride] / reverse[best], 3),
            **reverse_times,
            "mixed_s": round(times["mixed"], 3),
            "time_ratio": round(times["mixed"] / reverse_times["reverse_s"], 3),
            "meta_gradient_relative_difference": diff,
        }
    return rows


def _large_rows(
    models: dict[str, dict],
    episode: dict,
    steps: int,
    workers: int = 1,
    support_chunk: int | None = None,
    whole_model_chunk: int | None = WHOLE_MODEL_CHUNK,
    repeats: int = 2,
) -> dict[str, dict[str, Any]]:
    """`_rows` for an episode whose calls take many seconds. Peaks: one fresh process per configuration (after a
    1-step warm-up; `workers` at once: peaks do not depend on it); plain reverse is left out (it keeps every step's
    graph besides what `checkpoint: all` keeps: 1149 MB against 140 already on the 5-shot 32x32 ViT). Mixed mode runs
    with the query pass block by block in chunks, at each stride: block by block, whole and with `support_chunk` (else
    the model's SUPPORT_CHUNK; on models that allow it), and on models without batch statistics over the whole model
    with `whole_model_chunk`.
    Times: every configuration and reverse's best paths in turn in this process (`_times`), the best of
    `repeats` rounds (one round's times moved by up to 40% between runs on a loaded 2-core machine). The row's ratios
    are mixed mode's fastest configuration within MEMORY_TARGET, else its lowest peak."""
    strides = sorted({1, math.ceil(math.sqrt(steps))})
    options = {k: REVERSE[k] for k in ("blocks", "chunked")}
    rows = {}
    with ThreadPoolExecutor(workers) as pool:
        for m, spec in models.items():
            base = dict(model=spec, episode=episode, steps=steps)
            per_example = spec["name"] in PER_EXAMPLE_MODELS
            # (support chunk, block by block): block chunks where examples are independent or the batch statistics
            # are made explicit per block; whole-model products only in chunks (all at once they hold the whole
            # support set's activations and tangents, above reverse's peak) and only where examples are independent
            ways = [(None, True)]
            chunk = support_chunk or SUPPORT_CHUNK.get(spec["name"])
            if chunk and (per_example or spec["name"] in BLOCK_NORM_MODELS):
                ways.append((chunk, True))
            if whole_model_chunk and per_example:
                ways.append((whole_model_chunk, False))
            # mixed mode at its own lowest-memory query pass (block by block, in chunks): reverse's peak, its inner
            # double backward, does not depend on that option (116.1 MB and 116.2 MB on the 50-token ViT)
            mixed = {f"stride{s}" + (f"_chunk{c}" if c else "") + ("" if b else "_whole"):
                     dict(base, mode="mixed", stride=s, support_chunk=c, blocks=b, checkpoint=options["chunked"][0],
                          chunk=options["chunked"][1])
                     for s in strides for c, b in ways}  # fmt: skip
            reverse = {k: dict(base, mode="reverse", checkpoint=o[0], chunk=o[1]) for k, o in options.items()}
            jobs = {
                k: pool.submit(in_fresh_process, f"{__name__}:task_peak", warmup_steps=1, **v)
                for k, v in {**reverse, **mixed}.items()
            }
            peaks = {k: int(j.result()) for k, j in jobs.items()}
            best, timed = _best_reverse({k: peaks[k] for k in options})
            times, diff = _times({**{f"reverse_{k}": reverse[k] for k in timed}, **mixed}, repeats)
            reverse_times = _reverse_times(times, timed)
            table = {k: {"peak_bytes": peaks[k], "s": round(times[k], 3),
                         "memory_ratio": round(peaks[k] / peaks[best], 3),
                         "time_ratio": round(times[k] / reverse_times["reverse_s"], 3)} for k in mixed}  # fmt: skip
            within = [k for k in mixed if table[k]["memory_ratio"] <= MEMORY_TARGET]
            chosen = min(within, key=times.__getitem__) if within else min(mixed, key=peaks.__getitem__)
            rows[m] = {
                "reverse_peak_bytes": {k: peaks[k] for k in options},
                "best_reverse": best,
                "mixed": table,
                "mixed_configuration": chosen,
                "chosen_as": f"fastest within memory ratio {MEMORY_TARGET}" if within else "lowest peak",
                "mixed_stride": mixed[chosen]["stride"],
                "mixed_support_chunk": mixed[chosen]["support_chunk"],
                "mixed_blocks": mixed[chosen]["blocks"],
                "memory_ratio": table[chosen]["memory_ratio"],
                **reverse_times,
                "mixed_s": table[chosen]["s"],
                "time_ratio": table[chosen]["time_ratio"],
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
    mini: tuple[dict, dict[str, dict]] | None = None,
    skip_mini: bool = False,
    workers: int = 1,
) -> dict[str, Any]:
    """The rows on `episode` (5-way 1-shot 32x32), where weight copies dominate; on the `larger` (episode, models),
    a support set whose activations weigh more (the ViT only by default); and, unless `skip_mini`, on `mini`
    (5-way 5-shot 84x84, the 197-token ViT and ResNet-12 by default; `workers` processes at once), the regime the
    targets are stated for, and the 50-token ViT on the same episode beside them. The headline ratios are the worse
    model's on `mini` (else on the 32x32 episode): `mixed_mode_ratios_episode` names it."""
    episode = episode or EPISODE
    rows = _rows(models or MODELS, episode, steps, repeats)
    what = (f"one task's exact MAML meta-gradient, {steps} inner steps, {{}}, float32, CPU, 1 thread (times: its "
            "CPU seconds); ratios are mixed ({}) / the best reverse path")  # fmt: skip
    lower = "its lower-peak stride"
    out: dict[str, Any] = {"mixed_mode": {"what": what.format(_episode(episode), lower), **_worst(rows), **rows}}
    headline = (episode, out["mixed_mode"])
    larger_episode, larger_models = larger or (LARGER_EPISODE, {"vit": MODELS["vit"]})
    rows = _rows(larger_models, larger_episode, steps, repeats)
    out["mixed_mode_larger_support"] = {"what": what.format(_episode(larger_episode), lower), **_worst(rows), **rows}
    if not skip_mini:
        chosen = f"its fastest configuration within memory ratio {MEMORY_TARGET}, else its lowest peak"
        mini_episode, mini_models = mini or (MINI_EPISODE, MINI_MODELS)
        rows = _large_rows(mini_models, mini_episode, steps, workers)
        out["mixed_mode_miniimagenet"] = {"what": what.format(_episode(mini_episode), chosen), **_worst(rows), **rows}
        headline = (mini_episode, out["mixed_mode_miniimagenet"])
        if mini is None:
            rows = _large_rows(FEW_TOKEN_MODELS, MINI_EPISODE, steps, workers)
            out["mixed_mode_miniimagenet_few_tokens"] = {"what": what.format(_episode(MINI_EPISODE), chosen), **rows}
    return {
        "mixed_mode_memory_ratio": headline[1]["memory_ratio"],
        "mixed_mode_time_ratio": headline[1]["time_ratio"],
        "mixed_mode_ratios_episode": _episode(headline[0]),
        **out,
    }


def _worst(rows: dict[str, dict[str, Any]]) -> dict[str, float]:
    return {
        "memory_ratio": max(r["memory_ratio"] for r in rows.values()),
        "time_ratio": max(r["time_ratio"] for r in rows.values()),
    }
