"""Multi-source episodes (`data.source: multi`, Meta-Dataset style): several packed sets, one per episode.

Episode (step, slot) of a split first draws its set among those serving the split, with probability proportional
to its weight, from a stream of its own keyed by (seed, split, step, slot); then that set's reader (ShardTasks or
SampleTasks, per-class or per-sample shards, local or URL) draws the classes and examples as it would alone, from
`episode_rng(seed, split, step, slot)`. Both are pure in (seed, split, step, slot), so re-dispatch and resume
reproduce every episode. Each set's images are normalised with its own pack-time stats (`data.normalize`).
Sets must hold images of one shape (channels, height, width): a mix is refused otherwise, not resized, so a set's
pixels are what `metascale data pack --size` wrote (docs/data.md).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from metascale.config import MultiData
from metascale.data.tasks import SPLITS, Split, Task, TaskBatch, TaskList
from metascale.errors import DataError

_TAG = 0x4D495831  # 5th seed word: the set draw never shares a stream with an episode's or augmentation's


def pick_sources(weights: Sequence[float], seed: int, split: Split, step: int, slots: Sequence[int]) -> list[int]:
    """For each slot, the index (into `weights`) of the set its episode comes from."""
    edges = np.cumsum(np.asarray(weights, dtype=np.float64))
    edges /= edges[-1]
    out = []
    for slot in slots:
        u = np.random.default_rng(np.random.SeedSequence([seed, SPLITS.index(split), step, slot, _TAG])).random()
        out.append(min(int(np.searchsorted(edges, u, side="right")), len(edges) - 1))
    return out


def image_shape(source) -> tuple[int, int, int]:
    """(C, H, W) of a set's reader, from its index alone (no shard decoded)."""
    from metascale.data.episodes import ShardTasks
    from metascale.data.index import load_index

    if isinstance(source, ShardTasks):
        return tuple(load_index(source.root).shape)
    return tuple(source.index.shape)


class MultiTasks:
    """The TaskSource of `source: multi`: a TaskBatch per meta-batch (a TaskList with `sampler: meta_dataset`)."""

    def __init__(self, spec: MultiData, split: Split, seed: int):
        self.spec, self.split, self.seed = spec, split, seed
        self.members = spec.serving(split)
        if not self.members:
            raise DataError(f"data.sources: no source serves split '{split}'")
        self.weights = [spec.sources[i].weight for i in self.members]
        self._sources: list | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_sources": None}

    @property
    def sources(self) -> list:
        """One reader per serving set, checked to agree on image shape (each loads its index on first use)."""
        if self._sources is None:
            from metascale.data import build_task_source

            readers = [build_task_source(self.spec.source_spec(i), self.split, self.seed) for i in self.members]
            shapes = [image_shape(r) for r in readers]
            for i, shape in zip(self.members[1:], shapes[1:]):
                if shape != shapes[0]:
                    raise DataError(shape_mismatch(self.spec, self.members[0], shapes[0], i, shape))
            self._sources = readers
        return self._sources

    def batch(self, step: int, slots: Sequence[int]) -> TaskBatch | TaskList:
        slots = list(slots)
        picks = pick_sources(self.weights, self.seed, self.split, step, slots)
        tasks: list[Task | None] = [None] * len(slots)
        for k in sorted(set(picks)):
            at = [j for j, p in enumerate(picks) if p == k]
            got = self.sources[k].batch(step, [slots[j] for j in at])
            for j, task in zip(at, got.tasks()):
                tasks[j] = task
        return TaskList(tuple(tasks)) if self.spec.variable else TaskBatch.stack(tasks)


def shape_mismatch(spec: MultiData, a: int, shape_a: tuple, b: int, shape_b: tuple) -> str:
    return (
        f"data.sources: {spec.sources[b].url} holds {_shape(shape_b)} images, {spec.sources[a].url} "
        f"{_shape(shape_a)}; a mix needs one image shape (re-pack with metascale data pack --size)"
    )


def _shape(s: tuple) -> str:
    return f"{s[0]}x{s[1]}x{s[2]} (CxHxW)"
