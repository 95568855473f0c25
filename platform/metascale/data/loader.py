"""Meta-batches from loader worker processes: each worker builds whole TaskBatches, so the trainer only collects.

Worker w of W produces steps w, w + W, ... in order (TaskSource.batch is pure in (step, slot), so which process
builds a step changes nothing); the DataLoader interleaves workers back into step order.

Images do not travel through the DataLoader's pipes. Each worker owns a ring of shared-memory buffers allocated once
(as ffcv and DALI do); it writes a meta-batch (uint8 images from task shards, augmented there: data/images.py) into its next buffer and sends only
(step, ring slot, sequence number). The trainer converts the buffer to float32 (normalised), which is the one copy it needs anyway.
Measured here: torch tensors through the pipes (a new shared-memory segment per tensor per item) and pickled numpy
arrays were both slower (bench data). A buffer is reused only after the DataLoader's whole prefetch window has
passed it, and the sequence number stamped beside it is checked after the copy, so an overwrite cannot go unseen.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch.utils.data

from metascale.data.tasks import TaskBatch, TaskSource
from metascale.errors import MetascaleError, from_loader_worker

PREFETCH = 4  # meta-batches in flight per worker


class Ring:
    """`depth` shared-memory TaskBatch buffers per worker, shaped like `probe`, each with a sequence stamp."""

    def __init__(self, probe: TaskBatch, workers: int, depth: int):
        self.depth = depth
        self.fields = [[torch.empty_like(t).share_memory_() for t in _fields(probe)] for _ in range(workers * depth)]
        self.stamps = torch.full((workers * depth,), -1, dtype=torch.int64).share_memory_()

    def put(self, worker: int, seq: int, b: TaskBatch) -> int:
        slot = worker * self.depth + seq % self.depth
        for dst, src in zip(self.fields[slot], _fields(b)):
            dst.copy_(src)
        self.stamps[slot] = seq
        return slot

    def take(self, slot: int, seq: int, convert: Callable[[TaskBatch], TaskBatch] | None) -> TaskBatch:
        """`convert`: the source's uint8 -> float (normalising) conversion, the copy out of the ring."""
        b = TaskBatch(*(t.clone() if t.dtype != torch.uint8 or convert is None else t for t in self.fields[slot]))
        out = convert(b) if convert is not None else b
        if int(self.stamps[slot]) != seq:
            raise RuntimeError(f"loader ring slot {slot} was overwritten before it was read (seq {seq})")
        return out


def _fields(b: TaskBatch) -> list[torch.Tensor]:
    return [b.support_x, b.support_y, b.query_x, b.query_y]


def _build(source: TaskSource, step: int, slots: Sequence[int]) -> TaskBatch:
    """Task shards: augmented here (the worker), moved as uint8, normalised to float in the trainer."""
    raw = getattr(source, "episodes_uint8", None)
    return raw(step, slots) if raw else source.batch(step, slots)


class MetaBatches(torch.utils.data.IterableDataset):
    def __init__(self, source: TaskSource, steps: range, slots: Sequence[int], ring: Ring):
        self.source, self.steps, self.slots, self.ring = source, steps, list(slots), ring

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        info = torch.utils.data.get_worker_info()
        w, n = (info.id, info.num_workers) if info is not None else (0, 1)
        for seq, step in enumerate(self.steps[w::n]):
            yield step, self.ring.put(w, seq, _build(self.source, step, self.slots)), seq


def meta_batches(
    source: TaskSource, steps: range, slots: Sequence[int], workers: int = 2
) -> Iterator[tuple[int, TaskBatch]]:
    """(step, TaskBatch) for every step in order, built by `workers` processes (0: in this process)."""
    if workers == 0 or len(steps) == 0:
        for step in steps:
            yield step, source.batch(step, slots)
        return
    # The DataLoader keeps at most PREFETCH * workers items outstanding in all, so a worker's ring must be deeper.
    ring = Ring(_build(source, steps[0], slots), workers, PREFETCH * workers + 2)
    loader = torch.utils.data.DataLoader(
        MetaBatches(source, steps, slots, ring), batch_size=None, num_workers=workers, prefetch_factor=PREFETCH
    )
    convert = source.to_float if hasattr(source, "episodes_uint8") else None
    try:
        for step, slot, seq in loader:
            yield int(step), ring.take(int(slot), int(seq), convert)
    except MetascaleError as e:
        raise from_loader_worker(e) from None
