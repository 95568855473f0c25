"""The in-memory decoded class cache: every image of one split as one uint8 array, filled from the shards.

Every set this project ships fits (the glyph set's train split at 28x28 is ~18 MB decoded). Loading can fan out
over DataLoader workers, each reading a disjoint share of the shards; for sets larger than memory, `data.stream`
(data/stream.py) keeps one ClassStore per shard of a window of shards instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch.utils.data

from metascale.data.index import ShardIndex
from metascale.data.reader import ClassRecord, OnBad, ReadStats, read_records, shard_stream, split_shards
from metascale.data.tasks import Split
from metascale.errors import MetascaleError, from_loader_worker


@dataclass(frozen=True)
class ClassStore:
    images: np.ndarray  # uint8 [total, C, H, W], classes contiguous
    offsets: dict[int, int]  # class id -> first row
    counts: dict[int, int]  # class id -> rows present (may be below the index's count only under 'skip')
    stats: ReadStats

    def rows(self, class_id: int, instances: np.ndarray) -> np.ndarray:
        return self.offsets[class_id] + instances

    @staticmethod
    def from_records(records: list[ClassRecord], shape: tuple[int, int, int], stats: ReadStats) -> "ClassStore":
        records = sorted(records, key=lambda r: r.class_id)
        offsets, counts, at = {}, {}, 0
        for r in records:
            offsets[r.class_id], counts[r.class_id] = at, len(r.images)
            at += len(r.images)
        images = np.concatenate([r.images for r in records]) if records else np.zeros((0, *shape), np.uint8)
        return ClassStore(images, offsets, counts, stats)


def load_store(index: ShardIndex, root: str, split: Split, on_bad: OnBad = "error", workers: int = 0) -> ClassStore:
    """Reads every shard of `split` once; with workers > 0, DataLoader workers decode disjoint shard shares."""
    names = split_shards(index, split)
    stats = ReadStats()
    if workers <= 0 or len(names) < 2:
        # worker=0 of 1: inside a loader worker the cache still needs every shard of the split
        records = list(read_records(index, root, shard_stream(root, names, worker=0, workers=1), on_bad, stats))
        return ClassStore.from_records(records, index.shape, stats)
    ds = _ShardRecords(index, root, names, on_bad)
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=None,
        num_workers=min(workers, len(names)),
        multiprocessing_context="fork" if _can_fork() else None,
    )
    records = []
    try:
        for item in loader:
            if isinstance(item, ReadStats):
                stats.merge(item)
            else:
                records.append(ClassRecord(int(item[0]), np.asarray(item[1]), str(item[2])))
    except MetascaleError as e:
        raise from_loader_worker(e) from None
    return ClassStore.from_records(records, index.shape, stats)


class _ShardRecords(torch.utils.data.IterableDataset):
    """An IterableDataset of (class id, images, shard) for one worker's share, then that worker's ReadStats."""

    def __init__(self, index: ShardIndex, root: str, names: list[str], on_bad: OnBad):
        self.index, self.root, self.names, self.on_bad = index, root, names, on_bad

    def __iter__(self):
        stats = ReadStats()
        for r in read_records(self.index, self.root, shard_stream(self.root, self.names), self.on_bad, stats):
            yield r.class_id, r.images, r.shard
        yield stats


def _can_fork() -> bool:
    import multiprocessing

    return "fork" in multiprocessing.get_all_start_methods()
