"""The unit of meta-learning data: a task (episode) and a batch of same-shaped tasks.

Everything that produces tasks (synthetic families, shard samplers) returns these; everything that consumes them
(algorithms, workers) reads only these fields. Labels are episode-local (0..ways-1 for classification).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Literal, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from metascale.config import DataSpec


@dataclass(frozen=True)
class Task:
    """One episode: adapt on (support_x, support_y), evaluate on (query_x, query_y)."""

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "Task":
        return Task(*(_move(getattr(self, f.name), device, dtype) for f in fields(self)))


@dataclass(frozen=True)
class TaskBatch:
    """Tasks stacked along a leading task dimension T (all tasks share shapes: fixed ways/shots/queries)."""

    support_x: Tensor  # [T, S, ...]
    support_y: Tensor  # [T, S] (or [T, S, D] for regression)
    query_x: Tensor  # [T, Q, ...]
    query_y: Tensor  # [T, Q] (or [T, Q, D])

    @staticmethod
    def stack(tasks: list[Task]) -> "TaskBatch":
        if not tasks:
            raise ValueError("cannot stack an empty list of tasks")
        return TaskBatch(*(torch.stack([getattr(t, f.name) for t in tasks]) for f in fields(Task)))

    def __len__(self) -> int:
        return self.support_x.shape[0]

    def __getitem__(self, i: int) -> Task:
        return Task(*(getattr(self, f.name)[i] for f in fields(self)))

    def tasks(self) -> list[Task]:
        return [self[i] for i in range(len(self))]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "TaskBatch":
        return TaskBatch(*(_move(getattr(self, f.name), device, dtype) for f in fields(self)))


@dataclass(frozen=True)
class TaskList:
    """Tasks of different shapes (variable-way variable-shot episodes, data/sampler.py): what TaskBatch offers but
    the stacked tensors. The per-task executor, evaluation and ES read only `tasks()`; vmap needs a TaskBatch."""

    items: tuple[Task, ...]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Task:
        return self.items[i]

    def tasks(self) -> list[Task]:
        return list(self.items)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "TaskList":
        return TaskList(tuple(t.to(device, dtype) for t in self.items))


def _move(t: Tensor, device: torch.device | str, dtype: torch.dtype | None) -> Tensor:
    """Moves to device; casts only floating tensors (labels keep their integer type)."""
    if dtype is not None and t.is_floating_point():
        return t.to(device=device, dtype=dtype)
    return t.to(device=device)


Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")


class TaskSource(Protocol):
    """Produces the tasks of one split. `batch(step, slots)` is a pure function of (seed, split, step, slot), so any
    worker can (re)compute any slot of any meta-step: the coordinator's fault tolerance and resume rely on it."""

    def batch(self, step: int, slots: Sequence[int]) -> TaskBatch: ...


@runtime_checkable
class PartialSource(Protocol):
    """A source that holds part of its split at a time (data/stream.py): it says where held-out episodes come from."""

    def held_out(self, slots: Sequence[int]) -> TaskBatch: ...


def held_out(source: TaskSource, slots: Sequence[int]) -> TaskBatch:
    """Evaluation episode `slot` for each slot: `batch(0, slots)`, unless the source spreads them over its split."""
    return source.held_out(slots) if isinstance(source, PartialSource) else source.batch(0, slots)


def online_stream(source: TaskSource, tasks: Sequence[int]) -> TaskBatch:
    """Tasks `tasks` of the online stream: task t is episode (t, 0), the first of meta-step t, so a streaming source
    (data/stream.py) serves the stream from its shards in window order, as the tasks would arrive."""
    return TaskBatch.stack([source.batch(t, [0])[0] for t in tasks])


def episode_rng(seed: int, split: Split, step: int, slot: int) -> np.random.Generator:
    """The random stream of one episode; independent across (seed, split, step, slot)."""
    return np.random.default_rng(np.random.SeedSequence([seed, SPLITS.index(split), step, slot]))


class TaskSources:
    """A worker's task sources, one per split, built on first use (building one can decode a whole split)."""

    def __init__(self, data: "DataSpec", seed: int):
        self.data, self.seed = data, seed
        self._built: dict[Split, TaskSource] = {}

    def __call__(self, split: Split) -> TaskSource:
        if split not in self._built:
            from metascale.data import build_task_source

            self._built[split] = build_task_source(self.data, split, self.seed)
        return self._built[split]
