"""One many-shot classification task with corrupted training labels (Meta-Weight-Net's setting, Shu et al. 2019).

`ways` fixed classes of a base image family; per class a training set (thinned geometrically for class imbalance,
then a `label_noise` fraction of labels replaced uniformly at random: 'symmetric' noise), a small clean meta set and
a clean test set. As a TaskSource: a train-split task is (support: a training minibatch with its noisy labels,
query: a clean meta minibatch); a val/test task's query is a slice of the clean test set. Every draw is a pure
function of (seed, split, step, slot), like every other source, so the pool's fault tolerance holds.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from metascale.config import NoisyLabelsData
from metascale.data.tasks import Split, Task, TaskBatch, episode_rng


def class_images(spec: NoisyLabelsData, seed: int, per_class: int) -> np.ndarray:
    """float32 [ways, per_class, 1, size, size] from the base family (synthetic prototypes or rendered glyphs)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x4E4C]))
    size = spec.image_size
    if spec.base == "synthetic":
        protos = rng.standard_normal((spec.ways, 1, 1, size, size)).astype(np.float32)
        return protos + spec.noise * rng.standard_normal((spec.ways, per_class, 1, size, size)).astype(np.float32)
    from metascale.data.glyphs import catalog, render

    glyphs = catalog(spec.ways)
    return np.stack([render(g, rng, size, per_class)[:, None] for g in glyphs]).astype(np.float32) / 255.0


class NoisyLabelTasks:
    def __init__(self, spec: NoisyLabelsData, split: Split, seed: int):
        self.spec, self.split, self.seed = spec, split, seed
        n_train, n_meta, n_test = spec.train_per_class, spec.meta_per_class, spec.test_per_class
        images = class_images(spec, seed, n_train + n_meta + n_test)
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0x4E4D]))
        counts = [max(1, round(n_train * spec.imbalance ** (-c / max(spec.ways - 1, 1)))) for c in range(spec.ways)]
        self.train_x = np.concatenate([images[c, : counts[c]] for c in range(spec.ways)])
        self.true_y = np.concatenate([np.full(counts[c], c) for c in range(spec.ways)])
        corrupt = rng.random(len(self.true_y)) < spec.label_noise
        self.train_y = np.where(corrupt, rng.integers(0, spec.ways, len(self.true_y)), self.true_y)
        self.flipped = self.train_y != self.true_y  # corrupted and actually changed
        split_x = lambda lo, hi: images[:, lo:hi].reshape(-1, *images.shape[2:])  # noqa: E731
        split_y = lambda lo, hi: np.repeat(np.arange(spec.ways), hi - lo)  # noqa: E731
        self.meta_x, self.meta_y = split_x(n_train, n_train + n_meta), split_y(n_train, n_train + n_meta)
        order = rng.permutation(spec.ways * n_test)  # test slices mix classes (per-batch norms need that)
        self.test_x, self.test_y = split_x(n_train + n_meta, None)[order], split_y(0, n_test)[order]

    def task(self, step: int, slot: int) -> Task:
        s = self.spec
        rng = episode_rng(self.seed, self.split, step, slot)
        meta = rng.choice(len(self.meta_y), size=min(s.meta_batch_size, len(self.meta_y)), replace=False)
        if self.split == "train":
            train = rng.choice(len(self.train_y), size=min(s.batch, len(self.train_y)), replace=False)
            return _task(self.train_x[train], self.train_y[train], self.meta_x[meta], self.meta_y[meta])
        rows = (slot * s.meta_batch_size + np.arange(s.meta_batch_size)) % len(self.test_y)
        return _task(self.meta_x[meta], self.meta_y[meta], self.test_x[rows], self.test_y[rows])

    def batch(self, step: int, slots: Sequence[int]) -> TaskBatch:
        return TaskBatch.stack([self.task(step, slot) for slot in slots])


def _task(sx: np.ndarray, sy: np.ndarray, qx: np.ndarray, qy: np.ndarray) -> Task:
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    return Task(t(sx), t(sy).long(), t(qx), t(qy).long())
