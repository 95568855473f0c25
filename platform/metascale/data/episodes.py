"""Episodes from task shards: planned as a pure function of (seed, split, step, slot), materialised from the cache.

`EpisodePlanner` decides which classes (and rotations) and which instances an episode uses from class counts alone;
`ShardTasks` (the TaskSource of `source: shards|glyphs`) gathers the planned rows from the decoded `ClassStore`.
Any worker can therefore recompute any slot of any meta-step after a fault, and resume reproduces the data exactly.
With `data.sampler: meta_dataset` the same planner's classes feed data/sampler.py's variable-way variable-shot
episodes, which do not stack: a TaskList.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from metascale.config import AugmentSpec, EpisodicData
from metascale.data.images import ImagePipeline
from metascale.data.index import ShardIndex, load_index
from metascale.data.reader import OnBad
from metascale.data.store import ClassStore, load_store
from metascale.data.tasks import Split, Task, TaskBatch, TaskList, episode_rng
from metascale.errors import DataError

# Omniglot practice: augment.rot90 turns every class into 4 (0, 90, 180, 270 degrees), each its own class.
ROT90_TURNS = (0, 1, 2, 3)


@dataclass(frozen=True)
class PlannedClass:
    class_id: int
    quarter_turns: int
    instances: np.ndarray  # rows within the class: support first, then query


def examples_needed(spec: EpisodicData) -> int:
    """A class's fewest examples for an episode: shots+queries, or two for the variable sampler (data/sampler.py)."""
    return 2 if spec.variable else spec.shots + spec.queries


class EpisodePlanner:
    """The classes of a split usable for episodes needing `need` instances each, times their rotations."""

    def __init__(
        self,
        index: ShardIndex,
        split: Split,
        counts: dict[int, int],
        need: int,
        augment: AugmentSpec,
        seed: int,
        on_bad: OnBad = "error",
        classes: Sequence[int] | None = None,
    ):
        """`classes`: plan among these (a stream window's, data/stream.py) instead of the whole split's."""
        self.split, self.seed, self.need = split, seed, need
        ids = index.split_classes(split) if classes is None else sorted(classes)
        short = [i for i in ids if counts.get(i, 0) < need]
        if short and on_bad == "error":
            i = short[0]
            raise DataError(
                f"split '{split}': class {i} '{index.classes[i].name}' (shard "
                f"{index.shards[index.classes[i].shard].name}) has {counts.get(i, 0)} examples, fewer "
                f"than shots+queries={need} ({len(short)} such classes; on_bad_sample: skip leaves them out)"
            )
        self.skipped_classes = len(short)
        usable = [i for i in ids if counts.get(i, 0) >= need]
        turns = ROT90_TURNS if augment.rot90 else (0,)
        self.virtual = [(i, t) for i in usable for t in turns]
        self.counts = counts

    def plan(self, step: int, slot: int, ways: int, per_class: int) -> list[PlannedClass]:
        rng = episode_rng(self.seed, self.split, step, slot)
        return self._pick(rng, ways, [per_class] * ways)

    def _pick(self, rng: np.random.Generator, ways: int, per_class: list[int]) -> list[PlannedClass]:
        """Classes and instances without replacement, each in one vectorised draw (random keys, smallest first)."""
        if len(self.virtual) < ways:
            raise DataError(f"split '{self.split}' has {len(self.virtual)} usable classes, fewer than ways={ways}")
        picked = np.argpartition(rng.random(len(self.virtual)), ways - 1)[:ways]
        classes = [self.virtual[j] for j in picked]
        counts = np.array([self.counts[c] for c, _ in classes])
        keys = rng.random((ways, int(counts.max())))
        keys[np.arange(counts.max())[None, :] >= counts[:, None]] = 2.0  # beyond a class's count: never picked
        order = np.argsort(keys, axis=1, kind="stable")
        return [PlannedClass(c, t, order[i, :n]) for i, ((c, t), n) in enumerate(zip(classes, per_class))]


class Uint8Episodes:
    """A TaskSource that gathers its episodes as uint8 (`batch_uint8`); `episodes_uint8` adds the split's
    augmentation (what loader workers build and move), `to_float` normalises (in the trainer); the float batch and
    single tasks follow from them. Subclasses have `spec`, `split` and `seed`, and say where their set's
    normalisation stats come from (`image_stats`)."""

    def batch_uint8(self, step: int, slots: Sequence[int]) -> TaskBatch | TaskList:
        raise NotImplementedError

    def image_stats(self) -> dict | None:
        """The set's per-channel train mean/std, or None where it has none (then normalize reads [0, 1])."""
        raise NotImplementedError

    @property
    def pipeline(self) -> ImagePipeline:
        if getattr(self, "_pipeline", None) is None:
            stats = self.image_stats()
            self._pipeline = ImagePipeline(self.spec.augment, self.split, self.seed, stats, self.spec.normalize)
        return self._pipeline

    def episodes_uint8(self, step: int, slots: Sequence[int]) -> TaskBatch | TaskList:
        b = self.batch_uint8(step, slots)
        if isinstance(b, TaskList):
            from metascale.data.sampler import per_task

            return per_task(lambda one, at: self.pipeline.augment(one, step, at), b, slots)
        return self.pipeline.augment(b, step, slots)

    def to_float(self, b: TaskBatch | TaskList) -> TaskBatch | TaskList:
        if isinstance(b, TaskList):
            return TaskList(tuple(self.pipeline.to_float(TaskBatch.stack([t]))[0] for t in b.tasks()))
        return self.pipeline.to_float(b)

    def task(self, step: int, slot: int) -> Task:
        return self.batch(step, [slot])[0]

    def batch(self, step: int, slots: Sequence[int]) -> TaskBatch | TaskList:
        return self.to_float(self.episodes_uint8(step, slots))


class ShardTasks(Uint8Episodes):
    """The TaskSource of task shards: N-way K-shot Q-query episodes of one split. The index and the decoded cache
    load on first use (so the source pickles small, e.g. to Ray workers) and once per process."""

    def __init__(
        self, spec: EpisodicData, split: Split, seed: int, root: str, on_bad: OnBad = "error", load_workers: int = 0
    ):
        self.spec, self.split, self.seed, self.root = spec, split, seed, root
        self.on_bad, self.load_workers = on_bad, load_workers
        self._state: tuple[ClassStore, EpisodePlanner] | None = None

    def image_stats(self) -> dict | None:
        return load_index(self.root).stats

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_state": None}

    @property
    def store(self) -> ClassStore:
        return self._loaded()[0]

    @property
    def planner(self) -> EpisodePlanner:
        return self._loaded()[1]

    def _loaded(self) -> tuple[ClassStore, EpisodePlanner]:
        if self._state is None:
            index = load_index(self.root)
            store = load_store(index, self.root, self.split, self.on_bad, self.load_workers)
            need = examples_needed(self.spec)
            planner = EpisodePlanner(index, self.split, store.counts, need, self.spec.augment, self.seed, self.on_bad)
            self._state = (store, planner)
        return self._state

    def batch_uint8(self, step: int, slots: Sequence[int]) -> TaskBatch | TaskList:
        """The batch with images still uint8 (4x less to move between processes), gathered from the cache."""
        s = self.spec
        store, planner = self._loaded()
        if s.variable:
            from metascale.data.sampler import variable_uint8

            return variable_uint8(
                planner, step, slots, s.sampler, lambda cid, instances: store.images[store.offsets[cid] + instances]
            )
        plans = [planner.plan(step, slot, s.ways, s.shots + s.queries) for slot in slots]
        offsets = np.array([[store.offsets[p.class_id] for p in plan] for plan in plans])[:, :, None]  # [T, ways, 1]
        return assemble(s, plans, lambda instances: store.images[offsets + instances])


def assemble(
    spec: EpisodicData, plans: list[list[PlannedClass]], take: Callable[[np.ndarray], np.ndarray]
) -> TaskBatch:
    """uint8 episodes from their plans: `take(instances [T, ways, k])` returns the images [T, ways, k, C, H, W] as a
    new array. One gather for the support and one for the query set, and one rotation per quarter-turn count
    (per-image, per-task or per-class numpy calls dominated the cost)."""
    n, per = len(plans), spec.shots + spec.queries
    instances = np.array([[p.instances for p in plan] for plan in plans])  # [T, ways, per]
    turns = np.array([[p.quarter_turns for p in plan] for plan in plans])  # [T, ways]
    halves = []
    for lo, hi in ((0, spec.shots), (spec.shots, per)):
        x = take(instances[:, :, lo:hi])  # [T, ways, k, C, H, W]
        for t in np.unique(turns[turns > 0]):
            at = turns == t
            x[at] = np.rot90(x[at], int(t), axes=(-2, -1))
        x = x.reshape(n, spec.ways * (hi - lo), *x.shape[3:])  # class-major
        halves += [torch.from_numpy(x), torch.arange(spec.ways).repeat_interleave(hi - lo).expand(n, -1)]
    return TaskBatch(*halves)
