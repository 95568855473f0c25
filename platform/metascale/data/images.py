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
from metascale.config.data import CropSpec, JitterSpec
from metascale.data.tasks import SPLITS, Split, TaskBatch

_TAG = 0x41554733  # 5th seed word: augmentation keys never equal an episode's or a shard window's stream
DRAWS = 8  # per example: crop area, crop log-ratio, crop x, crop y, flip, brightness, contrast, saturation
CHUNK = 16  # images per jitter pass: ~1.3 MB of float32 at 84x84 RGB, so each pass runs in L2
_RANGE = {False: (0.0, 255.0), True: (0.5, 255.5)}  # clamp before / at the last blend (0.5: see _jitter)
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


def crop_boxes(u: torch.Tensor, h: int, w: int, spec: CropSpec) -> torch.Tensor:
    """[N, 4] int64 (top, left, height, width) pixel boxes, as torchvision's RandomResizedCrop draws them (area
    fraction uniform in `scale`, log-uniform aspect ratio, sides rounded, offset uniform over the integer positions),
    except that a side longer than the image is clamped to it instead of redrawn."""
    (s0, s1), (r0, r1) = spec.scale, spec.ratio
    area = (s0 + u[:, 0] * (s1 - s0)) * (h * w)
    ratio = torch.exp(math.log(r0) + u[:, 1] * (math.log(r1) - math.log(r0)))
    bw = torch.sqrt(area * ratio).round().clamp(1, w)
    bh = torch.sqrt(area / ratio).round().clamp(1, h)
    left = (u[:, 2] * (w - bw + 1)).floor()
    top = (u[:, 3] * (h - bh + 1)).floor()
    return torch.stack([top, left, bh, bw], 1).to(torch.int64)


def augment_images(x: torch.Tensor, u: torch.Tensor, spec: AugmentSpec) -> torch.Tensor:
    """uint8 [N, C, H, W] -> uint8 [N, C, H, W]: crop (an integer box resized back to H x W, bilinear in uint8 as
    torchvision's tensor path) and flip, then brightness, contrast and saturation; `u` [N, DRAWS] float64 uniforms."""
    n, c, h, w = x.shape
    flip = (u[:, 4] < 0.5).tolist() if spec.flip else [False] * n
    if spec.crop is not None:
        y = _crop(x, crop_boxes(u, h, w, spec.crop), flip)
    elif any(flip):
        y = x.clone()
        y[torch.tensor(flip)] = y[torch.tensor(flip)].flip(-1)
    else:
        y = x
    return y if spec.jitter is None else _jitter(y, u, spec.jitter, out=None if y is x else y)


def _crop(x: torch.Tensor, boxes: torch.Tensor, flip: list[bool]) -> torch.Tensor:
    """Each image's box resized to H x W (and mirrored where drawn). Channels-last uint8 takes torch's vectorised
    bilinear path (antialiased as torchvision's: for a box no larger than the image, plain bilinear with half-pixel
    centres, as PIL's resize of the same box)."""
    src, out = _channels_last(x), torch.empty_like(x, memory_format=torch.channels_last)
    h, w = x.shape[2:]
    for k, (top, left, bh, bw) in enumerate(boxes.tolist()):
        box = src[k : k + 1, :, top : top + bh, left : left + bw]
        r = F.interpolate(box, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        out[k : k + 1] = r.flip(-1) if flip[k] else r
    return _channels_first(out)


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """`x.contiguous(memory_format=torch.channels_last)`, one channel at a time: ~3x faster for uint8 RGB here."""
    out = torch.empty_like(x, memory_format=torch.channels_last)
    for ch in range(x.shape[1]):
        out[:, ch] = x[:, ch]
    return out


def _channels_first(x: torch.Tensor) -> torch.Tensor:
    """The way back to contiguous [N, C, H, W], the same way."""
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    for ch in range(x.shape[1]):
        out[:, ch] = x[:, ch]
    return out


def _jitter(y: torch.Tensor, u: torch.Tensor, j: JitterSpec, out: torch.Tensor | None) -> torch.Tensor:
    """torchvision's brightness, contrast and saturation formulas in float, on 0..255 values, rounded once at the
    end; CHUNK images at a time so every pass stays in cache. `out` may be `y` (each chunk is read before written)."""
    n, c = y.shape[:2]

    def factor(col: int, x: float) -> torch.Tensor:
        lo = max(0.0, 1.0 - x)
        return (lo + u[:, col] * (1.0 + x - lo)).to(torch.float32).view(n, 1, 1, 1)

    fb, fc, fs = factor(5, j.brightness), factor(6, j.contrast), factor(7, j.saturation)
    grey = torch.tensor(_GREY if c == 3 else (1.0,), dtype=torch.float32)
    out = torch.empty_like(y) if out is None else out
    brighter = (fb.view(n) > 1).tolist()
    for a in range(0, n, CHUNK):
        b = min(a + CHUNK, n)
        f = y[a:b].to(torch.float32).mul_(fb[a:b])  # brightness: a blend with black; only a factor > 1 passes 255
        if any(brighter[a:b]):
            f.clamp_(max=255.0)
        mean = (f.mean(dim=(2, 3)) @ grey).view(-1, 1, 1, 1)  # of the grey image, as torchvision's contrast
        k = fc[a:b]
        # The last blend adds the 0.5 that makes the truncating cast below round. (mul_ then add_, each with one
        # per-image operand, stay on torch's vectorised loops; a fused addcmul with two such operands did not: 2.4x.)
        last = c != 3
        f.mul_(k).add_((1 - k) * mean + (0.5 if last else 0.0)).clamp_(*_RANGE[last])
        if not last:
            k = fs[a:b]
            w = grey.view(1, 3, 1, 1) * (1 - k)  # [chunk, 3, 1, 1]: each channel's weight in the blend
            g = torch.mul(f[:, 0:1], w[:, 0:1]).addcmul_(f[:, 1:2], w[:, 1:2]).addcmul_(f[:, 2:3], w[:, 2:3])
            f.mul_(k).add_(g.add_(0.5)).clamp_(*_RANGE[True])
        out[a:b] = f  # the cast truncates: values in [0.5, 255.5] round half up to 0..255
    return out


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
