"""Synthetic task families: sinusoid regression (MAML paper, 5.1) and a prototype-plus-noise image family."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from metascale.config import SinusoidData, SyntheticImagesData
from metascale.data.tasks import Split, Task, TaskBatch, episode_rng
from metascale.errors import DataError


class SinusoidTasks:
    """y = A sin(x - phase), A ~ U[0.1, 5], phase ~ U[0, pi], x ~ U[-5, 5]; K support and Q query points."""

    def __init__(self, spec: SinusoidData, split: Split, seed: int):
        self.spec, self.split, self.seed = spec, split, seed

    def task(self, step: int, slot: int) -> Task:
        s = self.spec
        rng = episode_rng(self.seed, self.split, step, slot)
        amp, phase = rng.uniform(*s.amplitude), rng.uniform(*s.phase)
        x = rng.uniform(*s.x_range, size=(s.shots + s.queries, 1))
        y = amp * np.sin(x - phase)
        x, y = torch.from_numpy(x).float(), torch.from_numpy(y).float()
        return Task(x[: s.shots], y[: s.shots], x[s.shots :], y[s.shots :])

    def batch(self, step: int, slots: Sequence[int]) -> TaskBatch:
        return TaskBatch.stack([self.task(step, slot) for slot in slots])


def split_classes(classes: int, split: Split) -> range:
    """The class ids of a split of the synthetic image family: the first 64% train, the next 16% val, the rest test."""
    n_train, n_val = int(classes * 0.64), int(classes * 0.16)
    bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, classes)}
    return range(*bounds[split])


class SyntheticImageTasks:
    """Each class is a fixed random image (its prototype); instances add Gaussian noise. Classes are split
    64/16/20 percent into train/val/test, so held-out classes are never seen in meta-training."""

    def __init__(self, spec: SyntheticImagesData, split: Split, seed: int):
        self.spec, self.split, self.seed = spec, split, seed
        g = np.random.default_rng(np.random.SeedSequence([seed, 7919]))
        shape = (spec.classes, spec.channels, spec.image_size, spec.image_size)
        protos = g.standard_normal(shape).astype(np.float32)
        ids = split_classes(spec.classes, split)
        if len(ids) < spec.ways:
            raise DataError(f"data: split '{split}' has {len(ids)} classes, fewer than ways ({spec.ways})")
        self.protos = protos[ids.start : ids.stop]

    def task(self, step: int, slot: int) -> Task:
        s = self.spec
        rng = episode_rng(self.seed, self.split, step, slot)
        classes = rng.choice(len(self.protos), size=s.ways, replace=False)
        per = s.shots + s.queries
        x = self.protos[classes][:, None] + s.noise * rng.standard_normal((s.ways, per, *self.protos.shape[1:]))
        x = torch.from_numpy(x.astype(np.float32))
        y = torch.arange(s.ways).repeat_interleave(per).view(s.ways, per)
        sx, qx = x[:, : s.shots].flatten(0, 1), x[:, s.shots :].flatten(0, 1)
        sy, qy = y[:, : s.shots].flatten(), y[:, s.shots :].flatten()
        return Task(sx, sy, qx, qy)

    def batch(self, step: int, slots: Sequence[int]) -> TaskBatch:
        return TaskBatch.stack([self.task(step, slot) for slot in slots])
