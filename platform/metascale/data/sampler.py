"""Meta-Dataset's variable-way variable-shot episodes (Triantafillou et al., ICLR 2020, appendix; reference code
google-research/meta-dataset `meta_dataset/data/sampling.py`), planned from class counts alone.

An episode's draws come from `episode_rng(seed, split, step, slot)`, in a fixed order (ways, classes, instance
order, support size, class weights), so any worker recomputes any slot. Shapes differ per episode: a meta-batch is
a TaskList (data/tasks.py), each task class-major with labels 0..ways-1 as in fixed-shape episodes.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from metascale.config.samplers import MetaDatasetSampler
from metascale.data.episodes import EpisodePlanner, PlannedClass
from metascale.data.tasks import Task, TaskBatch, TaskList, episode_rng
from metascale.errors import DataError

MIN_EXAMPLES = 2  # a class needs one query and one support example (the reference raises below 2)


def draw_shape(rng: np.random.Generator, counts: np.ndarray, s: MetaDatasetSampler) -> tuple[int, np.ndarray]:
    """(queries per class, shots per class) for chosen classes of sizes `counts` (all >= MIN_EXAMPLES)."""
    ways = len(counts)
    queries = min(s.max_queries, int(counts.min()) // 2)
    remaining = counts - queries
    contrib = np.minimum(s.max_support_per_class, remaining)
    size = min(int(np.floor(rng.random() * contrib + 1).sum()), s.max_support)  # >= ways: each class adds >= 1
    weights = counts * np.exp(rng.uniform(s.log_weight[0], s.log_weight[1], size=ways))
    shots = np.floor(weights / weights.sum() * (size - ways)).astype(np.int64) + 1
    return queries, np.minimum(shots, remaining)


def plan_variable(
    planner: EpisodePlanner, step: int, slot: int, s: MetaDatasetSampler
) -> tuple[list[PlannedClass], list[int]]:
    """Episode (step, slot): its classes with support+query instances (support first), and each class's shots."""
    rng = episode_rng(planner.seed, planner.split, step, slot)
    top = min(s.max_ways, len(planner.virtual))
    if top < s.min_ways:
        raise DataError(f"split '{planner.split}' has {top} usable classes, fewer than sampler.min_ways={s.min_ways}")
    ways = int(rng.integers(s.min_ways, top + 1))
    picked = np.argpartition(rng.random(len(planner.virtual)), ways - 1)[:ways]
    classes = [planner.virtual[j] for j in picked]
    counts = np.array([planner.counts[c] for c, _ in classes])
    order = [np.argsort(rng.random(n), kind="stable") for n in counts]
    queries, shots = draw_shape(rng, counts, s)
    plan = [PlannedClass(c, t, o[: k + queries]) for (c, t), o, k in zip(classes, order, shots)]
    return plan, [int(k) for k in shots]


def variable_uint8(
    planner: EpisodePlanner,
    step: int,
    slots: Sequence[int],
    s: MetaDatasetSampler,
    take: Callable[[int, np.ndarray], np.ndarray],
) -> TaskList:
    """uint8 episodes; `take(class_id, instances)` returns that class's images [k, C, H, W]."""
    tasks = []
    for slot in slots:
        plan, shots = plan_variable(planner, step, slot, s)
        sx, sy, qx, qy = [], [], [], []
        for label, (p, k) in enumerate(zip(plan, shots)):
            imgs = take(p.class_id, p.instances)
            if p.quarter_turns:
                imgs = np.rot90(imgs, p.quarter_turns, axes=(-2, -1))
            sx.append(imgs[:k])
            qx.append(imgs[k:])
            sy += [label] * k
            qy += [label] * (len(imgs) - k)
        tasks.append(Task(_cat(sx), torch.tensor(sy), _cat(qx), torch.tensor(qy)))
    return TaskList(tuple(tasks))


def _cat(parts: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.concatenate(parts)))


def per_task(fn: Callable[[TaskBatch, Sequence[int]], TaskBatch], tasks: TaskList, slots: Sequence[int]) -> TaskList:
    """A batch-wise step (augment, to_float) applied to each task of a TaskList as a batch of one."""
    return TaskList(tuple(fn(TaskBatch.stack([t]), [slot])[0] for t, slot in zip(tasks.tasks(), slots)))
