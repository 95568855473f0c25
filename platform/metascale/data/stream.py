"""Episodes from shard sets larger than memory: a window of shards is the shuffle buffer, and episodes stay pure.

Each epoch permutes the split's shards with a generator seeded from (seed, split, epoch); window g (meta-steps
g * window_steps ...) is the next `window_shards` shards of its epoch's permutation, so which classes an episode may
use follows from (seed, split, step) and the index alone. Within the window, `EpisodePlanner` draws as for the whole
split, from `episode_rng(seed, split, step, slot)`: a lost worker's slots and a resumed job get the same bytes.
Decoded shards live in a small LRU (at most `window_shards` per process), read with the checking reader, so bad data
is handled exactly as by the whole-split cache. The price: an episode only mixes classes of one window.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from metascale.config import EpisodicData, StreamSpec
from metascale.data.episodes import EpisodePlanner, Uint8Episodes, assemble
from metascale.data.index import ShardIndex, load_index
from metascale.data.reader import OnBad, ReadStats, read_records, shard_stream
from metascale.data.store import ClassStore
from metascale.data.tasks import SPLITS, Split, Task, TaskBatch
from metascale.errors import DataError

_TAG = 0x57494E44  # 5th seed word: no episode_rng seed (4 words) gives the shard permutation's stream


def window_of(shards: Sequence[int], size: int, seed: int, split: Split, window: int) -> tuple[int, ...]:
    """The shards of window `window`: epoch = window // windows per epoch; the last window of an epoch wraps to the
    start of the same permutation, so every window has min(size, len(shards)) distinct shards."""
    n = len(shards)
    size = min(size, n)
    per_epoch = -(-n // size)
    epoch, w = divmod(window, per_epoch)
    perm = np.random.default_rng(np.random.SeedSequence([seed, SPLITS.index(split), epoch, 0, _TAG])).permutation(n)
    return tuple(shards[perm[(w * size + j) % n]] for j in range(size))


class ShardCache:
    """Decoded shards (one ClassStore each), least recently used evicted first: never more than `capacity`."""

    def __init__(self, index: ShardIndex, root: str, on_bad: OnBad, capacity: int):
        self.index, self.root, self.on_bad, self.capacity = index, root, on_bad, capacity
        self.stores: OrderedDict[int, ClassStore] = OrderedDict()
        self.stats: dict[int, ReadStats] = {}  # per shard, from its first decode
        self.decodes = 0

    def get(self, shard: int) -> ClassStore:
        if shard in self.stores:
            self.stores.move_to_end(shard)
            return self.stores[shard]
        while len(self.stores) >= self.capacity:  # evict before decoding: the bound holds at every moment
            self.stores.popitem(last=False)
        name = self.index.shards[shard].name
        stats = ReadStats()
        records = list(
            read_records(
                self.index, self.root, shard_stream(self.root, [name], worker=0, workers=1), self.on_bad, stats
            )
        )
        self.stats.setdefault(shard, stats)
        self.decodes += 1
        self.stores[shard] = ClassStore.from_records(records, self.index.shape, stats)
        return self.stores[shard]


@dataclass(frozen=True)
class _Window:
    number: int
    shards: tuple[int, ...]
    stores: list[ClassStore]
    where: dict[int, int]  # class id -> position of its shard in `shards`
    planner: EpisodePlanner


class StreamTasks(Uint8Episodes):
    """The TaskSource of `source: shards|glyphs` with `stream` set: ShardTasks' batch, batch_uint8 and task, with
    memory bounded by the window. State loads on first use (the source pickles small, e.g. to Ray workers)."""

    def __init__(
        self, spec: EpisodicData, stream: StreamSpec, split: Split, seed: int, root: str, on_bad: OnBad = "error"
    ):
        self.spec, self.stream, self.split, self.seed, self.root, self.on_bad = spec, stream, split, seed, root, on_bad
        self._state: tuple[ShardIndex, list[int], ShardCache] | None = None  # index, the split's shards, cache
        self._window: _Window | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_state": None, "_window": None}

    def image_stats(self) -> dict | None:
        return self._loaded()[0].stats

    def _loaded(self) -> tuple[ShardIndex, list[int], ShardCache]:
        if self._state is None:
            index = load_index(self.root)
            shards = self.check(index)
            cache = ShardCache(index, self.root, self.on_bad, min(self.stream.window_shards, len(shards)))
            self._state = (index, shards, cache)
        return self._state

    @property
    def cache(self) -> ShardCache:
        return self._loaded()[2]

    @property
    def stats(self) -> ReadStats:
        """What on_bad_sample 'skip' left out of the shards decoded so far."""
        total = ReadStats()
        for s in self.cache.stats.values():
            total.merge(s)
        return total

    def check(self, index: ShardIndex) -> list[int]:
        """From the index alone, before any shard is read: short classes (as the whole-split planner reports them)
        and the fewest usable classes any window can hold. Returns the split's shards."""
        shards = [i for i, s in enumerate(index.shards) if s.split == self.split]
        if not shards:
            raise DataError(f"{self.root}: split '{self.split}' has no shards")
        need = self.spec.shots + self.spec.queries
        counts = {i: c.count for i, c in enumerate(index.classes)}
        planner = EpisodePlanner(index, self.split, counts, need, self.spec.augment, self.seed, self.on_bad)
        per_shard = Counter(index.classes[c].shard for c, _ in planner.virtual)
        size = min(self.stream.window_shards, len(shards))
        poorest = sorted(shards, key=lambda s: (per_shard[s], s))[:size]
        if sum(per_shard[s] for s in poorest) < self.spec.ways:
            names = ", ".join(index.shards[s].name for s in poorest)
            raise DataError(
                f"data.stream: a window of {size} shard(s) of split '{self.split}' can hold as few as "
                f"{sum(per_shard[s] for s in poorest)} usable classes ({names}), fewer than "
                f"ways={self.spec.ways}; raise data.stream.window_shards"
            )
        return shards

    def window(self, step: int) -> _Window:
        """Meta-step `step`'s window, its shards decoded (the previous window is released first)."""
        number = step // self.stream.window_steps
        if self._window is not None and self._window.number == number:
            return self._window
        self._window = None  # drop its references, so evicted shards are freed
        index, split_shards, cache = self._loaded()
        shards = window_of(split_shards, self.stream.window_shards, self.seed, self.split, number)
        stores = [cache.get(s) for s in shards]
        where = {c: j for j, store in enumerate(stores) for c in store.offsets}
        counts = {c: n for store in stores for c, n in store.counts.items()}
        planner = EpisodePlanner(
            index,
            self.split,
            counts,
            self.spec.shots + self.spec.queries,
            self.spec.augment,
            self.seed,
            self.on_bad,
            classes=list(where),
        )
        if len(planner.virtual) < self.spec.ways:
            names = ", ".join(index.shards[s].name for s in shards)
            raise DataError(
                f"data.stream: window {number} of split '{self.split}' (meta-steps from "
                f"{number * self.stream.window_steps}; shards {names}) has {len(planner.virtual)} usable "
                f"classes, fewer than ways={self.spec.ways} (on_bad_sample: skip left some out)"
            )
        self._window = _Window(number, shards, stores, where, planner)
        return self._window

    def batch_uint8(self, step: int, slots: Sequence[int]) -> TaskBatch:
        """As ShardTasks.batch_uint8, gathering from the window's shards: one fancy index per shard and half."""
        s = self.spec
        win = self.window(step)
        plans = [win.planner.plan(step, slot, s.ways, s.shots + s.queries) for slot in slots]
        shard = np.array([[win.where[p.class_id] for p in plan] for plan in plans])  # [T, ways]
        offsets = np.array([[win.stores[win.where[p.class_id]].offsets[p.class_id] for p in plan] for plan in plans])
        shape = self._loaded()[0].shape

        def take(instances: np.ndarray) -> np.ndarray:
            out = np.empty((*instances.shape, *shape), np.uint8)
            for j in np.unique(shard):
                at = shard == j
                out[at] = win.stores[j].images[offsets[at][:, None] + instances[at]]
            return out

        return assemble(s, plans, take)

    def held_out(self, slots: Sequence[int]) -> TaskBatch:
        """Evaluation episodes from the whole split, not one window: episode `slot` is drawn in window slot % W of
        epoch 0 (its W windows hold every shard once), windows decoded one at a time."""
        per_epoch = -(-len(self._loaded()[1]) // self.cache.capacity)
        tasks: dict[int, Task] = {}
        for w in sorted({slot % per_epoch for slot in slots}):
            mine = [slot for slot in slots if slot % per_epoch == w]
            tasks.update(zip(mine, self.batch(w * self.stream.window_steps, mine).tasks()))
        return TaskBatch.stack([tasks[slot] for slot in slots])
