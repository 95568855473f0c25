"""Domain-labelled glyphs for domain generalisation (MLDG's setting, Li et al. 2018): the same `ways` characters drawn
in several stroke styles, each style a domain. One style (`target`) is held out of training.

A style restyles the drawers' strokes (glyphs.jitter) before they are drawn: pen width (thin, bold), an italic shear
(slant), a rotation (rotated), a shrink towards the centre (small); 'plain' is the glyph set's own look. Every
image comes from a generator seeded by (seed, style, character), so a domain is the same on every worker.

As a TaskSource: a train task is one MLDG meta-step's data, the source domains split at random into meta-train
(support: `batch` examples of each) and `meta_test_domains` meta-test domains (query: `batch` of each). A test task's
query is a slice of the target domain's held-out images; a val task's a slice of the source domains' held-out images
(model selection without the target). Every draw is a pure function of (seed, split, step, slot).
"""

from __future__ import annotations

import math
import zlib
from typing import Sequence

import numpy as np
import torch

from metascale.config import DomainsData
from metascale.data.strokes import Glyph
from metascale.data.tasks import Split, Task, TaskBatch, episode_rng

# style: (pen width factor, shear, rotation in radians, scale about the centre)
STYLES: dict[str, tuple[float, float, float, float]] = {
    "plain": (1.0, 0.0, 0.0, 1.0),
    "thin": (0.4, 0.0, 0.0, 1.0),
    "bold": (2.2, 0.0, 0.0, 1.0),
    "slant": (1.0, 0.5, 0.0, 1.0),
    "rotated": (1.0, 0.0, math.radians(40), 1.0),
    "small": (1.0, 0.0, 0.0, 0.6),
}


def render_style(style: str, glyphs: list[Glyph], per_class: int, size: int, seed: int) -> np.ndarray:
    """float32 [len(glyphs), per_class, 1, size, size] in [0, 1]: the glyphs drawn in `style`."""
    from metascale.data.glyphs import draw, jitter

    width, shear, angle, scale = STYLES[style]
    cos, sin = math.cos(angle), math.sin(angle)
    out = []
    for glyph in glyphs:
        rng = np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(f"{style}/{glyph.name}".encode())]))
        pts, widths, prepared = jitter(glyph, rng, per_class)
        x, y = pts[..., 0] - 0.5, pts[..., 1] - 0.5
        x = x - shear * y  # y grows downwards: the top leans right
        x, y = cos * x - sin * y, sin * x + cos * y
        pts = np.stack([x * scale + 0.5, y * scale + 0.5], axis=-1)
        out.append(draw(pts, widths * width, prepared, size)[:, None])
    return np.stack(out).astype(np.float32) / 255.0


class DomainEpisodes:
    """The MLDG task draw shared by domain sources: a subclass sets `spec` (batch, meta_test_domains, eval_batch),
    `split`, `seed`, `sources` (the keys of `train`), `train` (a source's training examples, (x, y)) and
    `eval_x`/`eval_y` (the held-out examples a val or test task's query slices)."""

    def task(self, step: int, slot: int) -> Task:
        s = self.spec
        rng = episode_rng(self.seed, self.split, step, slot)
        order = [self.sources[i] for i in rng.permutation(len(self.sources))]
        meta_test, meta_train = order[: s.meta_test_domains], order[s.meta_test_domains :]
        sx, sy = self._draw(rng, meta_train)
        if self.split != "train":
            rows = (slot * s.eval_batch + np.arange(s.eval_batch)) % len(self.eval_y)
            return _task(sx, sy, self.eval_x[rows], self.eval_y[rows])
        return _task(sx, sy, *self._draw(rng, meta_test))

    def _draw(self, rng: np.random.Generator, domains: list) -> tuple[np.ndarray, np.ndarray]:
        picks = [(self.train[d], rng.choice(len(self.train[d][1]), self.spec.batch, replace=False)) for d in domains]
        return np.concatenate([x[i] for (x, _), i in picks]), np.concatenate([y[i] for (_, y), i in picks])

    def batch(self, step: int, slots: Sequence[int]) -> TaskBatch:
        return TaskBatch.stack([self.task(step, slot) for slot in slots])


class DomainTasks(DomainEpisodes):
    def __init__(self, spec: DomainsData, split: Split, seed: int):
        self.spec, self.split, self.seed = spec, split, seed
        self.sources = [d for d in spec.domains if d != spec.target]
        from metascale.data.glyphs import catalog

        n, held, glyphs = spec.per_class, spec.test_per_class, catalog(spec.ways)
        images = {d: render_style(d, glyphs, n + held, spec.image_size, seed) for d in spec.domains}
        labels = lambda k: np.repeat(np.arange(spec.ways), k)  # noqa: E731
        flat = lambda a: a.reshape(-1, *a.shape[2:])  # noqa: E731
        self.train = {d: (flat(images[d][:, :n]), labels(n)) for d in self.sources}
        held_out = [spec.target] if split == "test" else self.sources
        x = np.concatenate([flat(images[d][:, n:]) for d in held_out])
        y = np.concatenate([labels(held)] * len(held_out))
        order = np.random.default_rng(np.random.SeedSequence([seed, 0x444D])).permutation(len(y))  # mixed slices
        self.eval_x, self.eval_y = x[order], y[order]


def _task(sx: np.ndarray, sy: np.ndarray, qx: np.ndarray, qy: np.ndarray) -> Task:
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    return Task(t(sx), t(sy).long(), t(qx), t(qy).long())
