"""Meta-batches from loader worker processes: each worker builds whole TaskBatches, so the trainer only collects.

Worker w of W produces steps w, w + W, ... in order (TaskSource.batch is pure in (step, slot), so which process
builds a step changes nothing); the DataLoader interleaves workers back into step order.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch.utils.data

from metascale.data.episodes import to_float
from metascale.data.tasks import TaskBatch, TaskSource


class MetaBatches(torch.utils.data.IterableDataset):
    def __init__(self, source: TaskSource, steps: range, slots: Sequence[int]):
        self.source, self.steps, self.slots = source, steps, list(slots)

    def __iter__(self) -> Iterator[tuple]:
        info = torch.utils.data.get_worker_info()
        w, n = (info.id, info.num_workers) if info is not None else (0, 1)
        for step in self.steps[w::n]:
            raw = getattr(self.source, "batch_uint8", None)  # task shards: move uint8, convert in the trainer
            b = raw(step, self.slots) if raw else self.source.batch(step, self.slots)
            yield step, b.support_x, b.support_y, b.query_x, b.query_y


def meta_batches(source: TaskSource, steps: range, slots: Sequence[int], workers: int = 2) -> Iterator[tuple[int, TaskBatch]]:
    """(step, TaskBatch) for every step in order, built by `workers` processes (0: in this process)."""
    loader = torch.utils.data.DataLoader(MetaBatches(source, steps, slots), batch_size=None, num_workers=workers,
                                         prefetch_factor=4 if workers else None, persistent_workers=False)
    for step, *fields in loader:
        b = TaskBatch(*fields)
        yield int(step), (to_float(b) if b.support_x.dtype == torch.uint8 else b)
