"""`metascale bench inner-loop`: metascale's executor against a learn2learn-style per-task MAML, same run.

The baseline follows learn2learn's MAML (`clone_module` + `update_module`): per task it clones the module (a new
module graph whose parameters are differentiable copies), adapts it with `autograd.grad(create_graph=True)`, and
back-propagates the query loss into the original parameters. Two comparisons, same model, data and meta-batch:
- one thread each, in one process: the executor's per-task path vs the baseline (the same arithmetic, so this
  shows what metascale's machinery costs; the gradients are compared too);
- the same thread budget each (`throughput_ratio_vs_baseline`): metascale's whole meta-step as N Ray workers of
  one thread (publish, fan out, aggregate) vs the baseline with N torch threads, the way each is meant to use a
  machine (measured here: intra-op threads on small convolutions scale poorly and oversubscribe: 10-100x outliers).
Memory: what one task's meta-gradient adds to the peak resident set, in a fresh process each (bench/peak.py), with
nothing recomputed, with checkpointing ('all': inner steps, and the query pass block by block), and with the query
pass recomputed in chunks instead; and what each costs in time.
On a GPU (`--device cuda`) the comparison is the executor's batched strategy (vmap: all tasks in one graph) against
the same baseline on the same GPU, and memory is the CUDA allocator's peak.
"""

from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

from metascale.algorithms import build_algorithm
from metascale.algorithms.executor import meta_gradient
from metascale.bench.peak import added_bytes, in_fresh_process, settle
from metascale.config import AlgorithmSpec, Conv4Spec, InnerLoopSpec, SyntheticImagesData
from metascale.data import build_task_source
from metascale.data.tasks import TaskBatch
from metascale.models import build_model


def _tasks(ways: int, shots: int, queries: int, meta_batch: int) -> TaskBatch:
    src = build_task_source(SyntheticImagesData(ways=ways, shots=shots, queries=queries), "train", 0)
    return src.batch(0, range(meta_batch))


def _clone_module(module: nn.Module) -> nn.Module:
    """learn2learn's clone_module, condensed: a shallow copy of every submodule with cloned (graph-connected) params."""
    clone = copy.copy(module)
    clone._parameters = {k: (p.clone() if p is not None else None) for k, p in module._parameters.items()}
    clone._buffers = dict(module._buffers)
    clone._modules = {k: _clone_module(m) for k, m in module._modules.items()}
    return clone


def _update_module(module: nn.Module, updates: dict[str, torch.Tensor], prefix: str = "") -> None:
    for k in list(module._parameters):
        if module._parameters[k] is not None:
            module._parameters[k] = module._parameters[k] + updates[prefix + k]
    for name, child in module._modules.items():
        _update_module(child, updates, f"{prefix}{name}.")


def baseline_step(model: nn.Module, batch: TaskBatch, steps: int, lr: float) -> None:
    """One learn2learn-style second-order MAML meta-step's gradient computation (into model.*.grad)."""
    model.zero_grad(set_to_none=True)
    for task in batch.tasks():
        learner = _clone_module(model)
        for _ in range(steps):
            names, params = zip(*learner.named_parameters())
            loss = F.cross_entropy(learner(task.support_x), task.support_y)
            grads = torch.autograd.grad(loss, params, create_graph=True)
            _update_module(learner, {n: -lr * g for n, g in zip(names, grads)})
        (F.cross_entropy(learner(task.query_x), task.query_y) / len(batch)).backward()


def _best_interleaved(fns: dict, repeats: int, sync=lambda: None) -> dict[str, float]:
    """Best-of-`repeats` seconds per function, alternating them so that load on a shared machine hits all alike.
    `sync` waits for queued device work (CUDA runs asynchronously: a host clock alone would time the launches)."""
    for fn in fns.values():
        fn()  # warm-up
    sync()
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def _maml(
    steps: int,
    checkpoint: str = "none",
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    query_chunk: int | None = None,
):
    model = build_model(Conv4Spec(), 5).to(device, dtype)
    inner = InnerLoopSpec(steps=steps, lr=0.4, checkpoint=checkpoint, query_chunk=query_chunk)
    alg = build_algorithm(AlgorithmSpec(name="maml", inner=inner), model)
    return model, alg, alg.init(dict(model.named_parameters()))


def single_thread(meta_batch: int, steps: int, repeats: int) -> dict:
    """The executor alone vs the baseline, both in this process on one thread: the same computation."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    batch = _tasks(5, 1, 15, meta_batch)
    model, alg, meta = _maml(steps)
    best = _best_interleaved(
        {
            "ours": lambda: meta_gradient(alg, meta, batch, "per_task"),
            "base": lambda: baseline_step(model, batch, steps, 0.4),
        },
        repeats,
    )
    # The same numbers: a benchmark of a different computation would be worthless.
    mg = meta_gradient(alg, meta, batch, "per_task")
    baseline_step(model, batch, steps, 0.4)
    err = max(float((mg.grads[k] / meta_batch - p.grad).abs().max()) for k, p in model.named_parameters())
    return {
        "s_per_step_1_thread": best["ours"],
        "baseline_s_per_step_1_thread": best["base"],
        "ratio_1_thread": best["base"] / best["ours"],
        "max_abs_grad_diff": err,
    }


def thread_budget(meta_batch: int, steps: int, repeats: int, threads: int) -> dict:
    """Whole meta-steps with `threads` hardware threads each way: metascale as `threads` Ray workers of one thread
    (publish params, fan out, aggregate), the baseline as one process with `threads` torch threads."""
    from metascale.cluster.coordinator import Coordinator
    from metascale.cluster.estimators import backprop
    from metascale.cluster.pool import RayPool
    from metascale.config import parse_spec

    spec = parse_spec(
        {
            "name": "bench-inner-loop",
            "model": {"name": "conv4"},
            "data": {"source": "synthetic", "ways": 5, "shots": 1, "queries": 15},
            "algorithm": {"name": "maml", "inner": {"steps": steps, "lr": 0.4}},
            "outer": {"meta_batch": meta_batch},
            "cluster": {"workers": threads},
        }
    )
    coord = Coordinator(spec)
    pool = RayPool(spec)
    torch.set_num_threads(threads)
    model, _, _ = _maml(steps)
    batch = _tasks(5, 1, 15, meta_batch)
    try:
        best = _best_interleaved(
            {
                "ours": lambda: backprop(spec, pool, 0, pool.put(coord.published())),
                "base": lambda: baseline_step(model, batch, steps, 0.4),
            },
            repeats,
        )
    finally:
        pool.shutdown()
        torch.set_num_threads(1)
    return {
        "s_per_step": best["ours"],
        "baseline_s_per_step": best["base"],
        "throughput_ratio_vs_baseline": best["base"] / best["ours"],
    }


def task_peak_bytes(checkpoint: str, steps: int, shots: int, queries: int, query_chunk: int | None = None) -> int:
    """Runs in a fresh process (see peak.py): what one 5-way task's meta-gradient adds at its peak. A first call
    warms up (one-time allocations: kernel caches, checkpoint bookkeeping) and the second is measured."""
    torch.set_num_threads(1)
    batch = _tasks(5, shots, queries, 1)
    _, alg, meta = _maml(steps, checkpoint, query_chunk=query_chunk)
    meta_gradient(alg, meta, batch, "per_task")
    base = settle()
    meta_gradient(alg, meta, batch, "per_task")
    return added_bytes(base)


# What each memory configuration sets: nothing; every inner step and the query pass block by block; and the query
# pass recomputed QUERY_CHUNK examples at a time instead (algorithms/query_chunks.py).
QUERY_CHUNK = 15
MEMORY_CONFIGS = {"plain": ("none", None), "blocks": ("all", None), "chunked": ("all", QUERY_CHUNK)}


def _memory_row(peak: dict[str, int]) -> dict:
    """Peaks per MEMORY_CONFIGS entry, and the two ratios to plain."""
    return {
        **{f"peak_bytes_{k}": v for k, v in peak.items()},
        "ratio": peak["chunked"] / peak["plain"],
        "ratio_blocks": peak["blocks"] / peak["plain"],
    }


def checkpoint_memory(steps: int, shots: int, queries: int) -> dict:
    return _memory_row(
        {
            name: int(
                in_fresh_process(
                    f"{__name__}:task_peak_bytes",
                    checkpoint=c,
                    steps=steps,
                    shots=shots,
                    queries=queries,
                    query_chunk=qc,
                )
            )
            for name, (c, qc) in MEMORY_CONFIGS.items()
        }
    )


def checkpoint_time(steps: int, tasks: int, repeats: int) -> dict:
    """What the memory costs in time: seconds per 5-way 1-shot 15-query task's meta-gradient, one thread."""
    torch.set_num_threads(1)
    batch = _tasks(5, 1, 15, tasks)
    algs = {name: _maml(steps, c, query_chunk=qc)[1:] for name, (c, qc) in MEMORY_CONFIGS.items()}
    best = _best_interleaved(
        {k: lambda a=a, m=m: meta_gradient(a, m, batch, "per_task") for k, (a, m) in algs.items()}, repeats
    )
    return {f"s_per_task_{k}": v / tasks for k, v in best.items()}


def on_gpu(meta_batch: int, steps: int, repeats: int, memory_steps: int) -> dict:
    """Same meta-step on one GPU: the executor's vmap (tasks batched into one graph) and per-task paths vs the baseline;
    checkpointing's memory from the allocator's peak (`max_memory_allocated`) over what was allocated before."""
    dev = "cuda"
    torch.manual_seed(0)
    batch = _tasks(5, 1, 15, meta_batch).to(dev)
    model, alg, meta = _maml(steps, device=dev)
    best = _best_interleaved(
        {
            "vmap": lambda: meta_gradient(alg, meta, batch, "vmap"),
            "per_task": lambda: meta_gradient(alg, meta, batch, "per_task"),
            "base": lambda: baseline_step(model, batch, steps, 0.4),
        },
        repeats,
        torch.cuda.synchronize,
    )
    # The same numbers, checked in float64 (float32 convolutions on a GPU may use TF32 and differ by ~1e-3).
    model, alg, meta = _maml(steps, device=dev, dtype=torch.float64)
    mg = meta_gradient(alg, meta, batch.to(dev, torch.float64), "vmap")
    baseline_step(model, batch.to(dev, torch.float64), steps, 0.4)
    err = max(float((mg.grads[k] / meta_batch - p.grad).abs().max()) for k, p in model.named_parameters())

    def peak(checkpoint: str, query_chunk: int | None, shots: int, queries: int) -> int:
        one = _tasks(5, shots, queries, 1).to(dev)
        _, a, m = _maml(memory_steps, checkpoint, dev, query_chunk=query_chunk)
        meta_gradient(a, m, one, "per_task")  # warm-up: cuDNN workspaces, allocator pools
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        meta_gradient(a, m, one, "per_task")
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before

    memory = {}
    for shots, q in ((1, 15), (1, 1), (5, 5)):
        memory[f"{shots}shot_{q}query"] = _memory_row(
            {name: peak(c, qc, shots, q) for name, (c, qc) in MEMORY_CONFIGS.items()}
        )
    return {
        "benchmark": "inner-loop",
        "device": torch.cuda.get_device_name(),
        "setup": f"Conv-4 28x28x1, 5-way 1-shot 15 queries, meta-batch {meta_batch}, {steps} inner step(s), second "
        f"order, float32, one GPU; memory: one 5-way task, {memory_steps} inner steps; plain = checkpoint 'none', "
        f"blocks = 'all', chunked = 'all' + query_chunk {QUERY_CHUNK}",
        "s_per_step_vmap": best["vmap"],
        "s_per_step_per_task": best["per_task"],
        "baseline_s_per_step": best["base"],
        "throughput_ratio_vs_baseline": best["base"] / best["vmap"],
        "per_task_ratio_vs_baseline": best["base"] / best["per_task"],
        "max_abs_grad_diff_float64": err,
        "checkpoint_memory": memory,
        "checkpoint_memory_ratio": memory["1shot_15query"]["ratio"],
        "checkpoint_memory_ratio_blocks": memory["1shot_15query"]["ratio_blocks"],
    }


def run(meta_batch: int = 32, steps: int = 1, memory_steps: int = 10, repeats: int = 3, threads: int = 2) -> dict:
    single = single_thread(meta_batch, steps, repeats)
    budget = thread_budget(meta_batch, steps, repeats, threads)
    # A per-task loop keeps one task's graph alive at a time, so one task's peak is the figure that matters. The
    # query pass is recomputed, not avoided, so the more queries per task, the less checkpointing can save.
    memory = {
        f"{shots}shot_{q}query": checkpoint_memory(memory_steps, shots, q) for shots, q in ((1, 15), (1, 1), (5, 5))
    }
    memory["time"] = checkpoint_time(memory_steps, 4, repeats)
    return {
        "benchmark": "inner-loop",
        "setup": f"Conv-4 28x28x1, 5-way 1-shot 15 queries, meta-batch {meta_batch}, {steps} inner step(s), second "
        f"order; thread budget {threads} (metascale: {threads} Ray workers x 1 thread; baseline: {threads} torch "
        f"threads); memory: one 5-way task, {memory_steps} inner steps; plain = checkpoint 'none', blocks = 'all', "
        f"chunked = 'all' + query_chunk {QUERY_CHUNK}",
        **single,
        **budget,
        "checkpoint_memory": memory,
        "checkpoint_memory_ratio": memory["1shot_15query"]["ratio"],
        "checkpoint_memory_ratio_blocks": memory["1shot_15query"]["ratio_blocks"],
        "checkpoint_memory_ratio_1_query": memory["1shot_1query"]["ratio"],
    }
