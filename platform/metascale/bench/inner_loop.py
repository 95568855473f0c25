"""`metascale bench inner-loop`: metascale's executor against a learn2learn-style per-task MAML, same run.

The baseline follows learn2learn's MAML (`clone_module` + `update_module`): per task it clones the module (a new
module graph whose parameters are differentiable copies), adapts it with `autograd.grad(create_graph=True)`, and
back-propagates the query loss into the original parameters. Same model, data, thread count and meta-batch.
Memory is the peak RSS growth of a fresh child process per measurement (one process per configuration, so the
allocator's high-water marks do not leak from one run into the next).
"""

from __future__ import annotations

import copy
import multiprocessing as mp
import resource
import time

import torch
import torch.nn.functional as F
from torch import nn

from metascale.algorithms import build_algorithm
from metascale.algorithms.executor import meta_gradient
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


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_throughput(meta_batch: int, steps: int, repeats: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    batch = _tasks(5, 1, 15, meta_batch)
    model = build_model(Conv4Spec(), 5)
    alg = build_algorithm(AlgorithmSpec(name="maml", inner=InnerLoopSpec(steps=steps, lr=0.4)), model)
    meta = alg.init(dict(model.named_parameters()))
    ours = _time(lambda: meta_gradient(alg, meta, batch, "per_task"), repeats)
    base = _time(lambda: baseline_step(model, batch, steps, 0.4), repeats)
    # The same numbers: the two meta-gradients agree (a benchmark of a wrong computation is worthless).
    mg = meta_gradient(alg, meta, batch, "per_task")
    baseline_step(model, batch, steps, 0.4)
    err = max(float((mg.grads[k] / meta_batch - p.grad).abs().max()) for k, p in model.named_parameters())
    return {"metascale_s_per_step": ours, "baseline_s_per_step": base, "max_abs_grad_diff": err}


def _peak_child(checkpoint: str, steps: int, meta_batch: int, queue) -> None:
    torch.set_num_threads(1)
    batch = _tasks(5, 1, 15, meta_batch)
    model = build_model(Conv4Spec(), 5)
    alg = build_algorithm(
        AlgorithmSpec(name="maml", inner=InnerLoopSpec(steps=steps, lr=0.4, checkpoint=checkpoint)), model
    )
    meta = alg.init(dict(model.named_parameters()))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    meta_gradient(alg, meta, batch, "per_task")
    queue.put((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)


def peak_bytes(checkpoint: str, steps: int, meta_batch: int) -> int:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_child, args=(checkpoint, steps, meta_batch, queue))
    proc.start()
    value = queue.get(timeout=600)
    proc.join()
    return int(value)


def run(meta_batch: int = 32, steps: int = 1, memory_steps: int = 10, repeats: int = 3, threads: int = 1) -> dict:
    speed = measure_throughput(meta_batch, steps, repeats, threads)
    # One task at a time is what a per-task loop keeps alive, so one task's peak is the figure that matters.
    plain = peak_bytes("none", memory_steps, 1)
    checkpointed = peak_bytes("all", memory_steps, 1)
    return {
        "benchmark": "inner-loop",
        "setup": f"Conv-4 28x28x1, 5-way 1-shot 15 queries, meta-batch {meta_batch}, {steps} inner step(s), "
        f"second order, {threads} thread(s); memory: {memory_steps} inner steps",
        **speed,
        "throughput_ratio_vs_baseline": speed["baseline_s_per_step"] / speed["metascale_s_per_step"],
        "peak_bytes_plain": plain,
        "peak_bytes_checkpointed": checkpointed,
        "checkpoint_memory_ratio": checkpointed / plain,
    }
