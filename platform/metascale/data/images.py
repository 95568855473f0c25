"""The image pipeline of packed sets: per-channel normalisation from pack-time stats, and train-time augmentation.

Stats: `metascale data pack` sums pixels and squared pixels per channel over the train split's images in the same
pass that writes the shards (exact integer sums), and stores mean and std in the index. The reader maps uint8 x to
(x / 255 - mean) / std where the index has them and `data.normalize` is on; otherwise to x / 255, as before.

Augmentation (`data.augment`: crop, flip, jitter) runs in torch on CPU tensors where episodes are built (the loader
workers), on uint8 episodes and back to uint8, so the shared-memory ring still moves bytes. Each example's draws
come from a Philox (counter-based) generator keyed by (seed, split, step, slot): example i of an episode always uses
counter block i of its key, 8 uniforms, whatever else is on, so re-dispatch and resume rebuild the same bytes.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from metascale.config import AugmentSpec
from metascale.data.tasks import SPLITS, Split, TaskBatch

_TAG = 0x41554733  # 5th seed word: augmentation keys never equal an episode's or a shard window's stream
DRAWS = 8  # per example: crop area, crop log-ratio, crop x, crop y, flip, brightness, contrast, saturation
_GREY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale


class StatsAccumulator:
    """Per-channel sum and sum of squares of uint8 pixels, in int64 (exact for any set that fits a disk)."""

    def __init__(self) -> None:
        self.sums: np.ndarray | None = None
        self.squares: np.ndarray | None = None
        self.pixels = self.images = 0

    def add(self, img: np.ndarray) -> None:
        """`img`: uint8 [H, W] or [H, W, C]."""
        flat = img.reshape(-1, 1 if img.ndim == 2 else img.shape[2]).astype(np.int64)
        sums, squares = flat.sum(0), (flat * flat).sum(0)
        self.sums = sums if self.sums is None else self.sums + sums
        self.squares = squares if self.squares is None else self.squares + squares
        self.pixels += flat.shape[0]
        self.images += 1

    def result(self) -> dict | None:
        """{"mean", "std", "images"} in [0, 1] units (population std, as numpy's), or None when nothing was added."""
        if not self.pixels:
            return None
        mean = self.sums / self.pixels
        var = np.maximum(self.squares / self.pixels - mean * mean, 0.0)
        return {
            "mean": [float(m) for m in mean / 255],
            "std": [float(s) for s in np.sqrt(var) / 255],
            "images": self.images,
            "split": "train",
        }


def augment_key(seed: int, split: Split, step: int, slot: int) -> np.ndarray:
    return np.random.SeedSequence([seed, SPLITS.index(split), step, slot, _TAG]).generate_state(2, np.uint64)


def draws(seed: int, split: Split, step: int, slot: int, examples: int) -> np.ndarray:
    """[examples, DRAWS] uniforms in [0, 1): row i is Philox counter blocks 2i, 2i+1 of the episode's key."""
    return np.random.Generator(np.random.Philox(key=augment_key(seed, split, step, slot))).random((examples, DRAWS))


def augment_images(x: torch.Tensor, u: torch.Tensor, spec: AugmentSpec) -> torch.Tensor:
    """uint8 [N, C, H, W] -> uint8 [N, C, H, W]: crop (bilinear, resized back to H x W) and flip in one affine
    resampling, then brightness, contrast and saturation; `u` [N, DRAWS] float64 uniforms."""
    n, c, h, w = x.shape
    y = x.to(torch.float32).mul_(1.0 / 255.0)
    flip = u[:, 4] < 0.5 if spec.flip else torch.zeros(n, dtype=torch.bool)
    if spec.crop is not None:
        (s0, s1), (r0, r1) = spec.crop.scale, spec.crop.ratio
        area = s0 + u[:, 0] * (s1 - s0)  # fraction of the image
        ratio = torch.exp(math.log(r0) + u[:, 1] * (math.log(r1) - math.log(r0)))
        bw = torch.sqrt(area * ratio * h / w).clamp(max=1.0)  # box width / image width
        bh = torch.sqrt(area / ratio * w / h).clamp(max=1.0)
        cx = (2 * u[:, 2] - 1) * (1 - bw)  # box centre in [-1, 1] coordinates, the box inside the image
        cy = (2 * u[:, 3] - 1) * (1 - bh)
        theta = torch.zeros(n, 2, 3, dtype=torch.float64)
        theta[:, 0, 0] = torch.where(flip, -bw, bw)
        theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = cx, bh, cy
        grid = F.affine_grid(theta.to(torch.float32), [n, c, h, w], align_corners=False)
        y = F.grid_sample(y, grid, mode="bilinear", padding_mode="border", align_corners=False)
    elif flip.any():
        y[flip] = y[flip].flip(-1)
    j = spec.jitter
    if j is not None:

        def factor(col: int, x: float) -> torch.Tensor:
            lo = max(0.0, 1.0 - x)
            return (lo + u[:, col] * (1.0 + x - lo)).to(torch.float32).view(n, 1, 1, 1)

        y = y.mul_(factor(5, j.brightness)).clamp_(0, 1)
        mean = _grey(y).mean(dim=(-3, -2, -1), keepdim=True)
        k = factor(6, j.contrast)
        y = y.mul_(k).add_((1 - k) * mean).clamp_(0, 1)
        if c == 3:
            k = factor(7, j.saturation)
            y = y.mul_(k).add_((1 - k) * _grey(y)).clamp_(0, 1)
    return y.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)


def _grey(y: torch.Tensor) -> torch.Tensor:
    if y.shape[1] == 1:
        return y
    return _GREY[0] * y[:, 0:1] + _GREY[1] * y[:, 1:2] + _GREY[2] * y[:, 2:3]


class ImagePipeline:
    """What a packed set's source does to its uint8 episodes: augment (train split only) and convert to float."""

    def __init__(self, augment: AugmentSpec, split: Split, seed: int, stats: dict | None, normalize: bool):
        self.spec, self.split, self.seed = augment, split, seed
        self.augments = augment.per_example and split == "train"
        self.stats = stats if normalize else None
        if self.stats is not None:
            self.mean = torch.tensor(self.stats["mean"], dtype=torch.float32).view(-1, 1, 1)
            self.inv_std = 1.0 / torch.tensor(self.stats["std"], dtype=torch.float32).clamp(min=1e-6).view(-1, 1, 1)

    def augment(self, b: TaskBatch, step: int, slots: Sequence[int]) -> TaskBatch:
        """Each task's support then query examples, numbered in that order, augmented from the slot's draws."""
        if not self.augments:
            return b
        t, s = b.support_x.shape[:2]
        q = b.query_x.shape[1]
        x = torch.cat([b.support_x, b.query_x], dim=1).flatten(0, 1)  # [T * (S + Q), C, H, W]
        u = torch.from_numpy(np.concatenate([draws(self.seed, self.split, step, slot, s + q) for slot in slots]))
        out = augment_images(x, u, self.spec).view(t, s + q, *x.shape[1:])
        return TaskBatch(out[:, :s].contiguous(), b.support_y, out[:, s:].contiguous(), b.query_y)

    def to_float(self, b: TaskBatch) -> TaskBatch:
        """uint8 images -> float32: (x / 255 - mean) / std with stats, x / 255 without."""
        return TaskBatch(self._float(b.support_x), b.support_y, self._float(b.query_x), b.query_y)

    def _float(self, x: torch.Tensor) -> torch.Tensor:
        y = x.to(torch.float32).mul_(1.0 / 255.0)
        return y if self.stats is None else y.sub_(self.mean).mul_(self.inv_std)
