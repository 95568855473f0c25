"""Fault drills: make one chosen worker process die or hang, or one chosen episode non-finite, at a chosen
meta-step, to check (and to show operators) that a run survives it: after a lost process it ends where a fault-free
run ends; a non-finite episode meets `executor.nonfinite`. Off unless the driver's environment sets METASCALE_FAULT;
the pool passes the drill's variables on to every worker process.

  METASCALE_FAULT       "exit:<step>:<worker>[:<rank>]"  rank (default 0) of worker exits as it starts meta-step
                                                          <step>'s meta-gradient (or truncated unroll)
                        "hang:<step>:<worker>[:<rank>]"  the same process stops instead (SIGSTOP: alive, silent)
                        "nan:<step>:<slot>"              episode (step, slot)'s query inputs become NaN, on whichever
                                                          worker computes it, every time
  METASCALE_FAULT_ONCE  exit and hang: a file created when the fault fires; while it exists the fault never fires
                        again, so the recomputation on a restarted or rebuilt worker runs clean (required)
"""

from __future__ import annotations

import dataclasses
import os
import signal
from typing import Sequence

import torch

from metascale.data.tasks import TaskBatch, TaskList

FAULT, ONCE = "METASCALE_FAULT", "METASCALE_FAULT_ONCE"


def forwarded() -> dict[str, str]:
    """The drill's variables as set in this (the driver's) environment, for the workers' runtime_env."""
    return {k: os.environ[k] for k in (FAULT, ONCE) if os.environ.get(k)}


def _drill() -> tuple[str, list[int]] | None:
    text = os.environ.get(FAULT)
    if not text:
        return None
    kind, *where = text.split(":")
    return kind, [int(x) for x in where]


def maybe_fire(step: int | None, worker: int, rank: int = 0) -> None:
    """exit and hang drills: called by every worker process as it starts a meta-gradient item."""
    drill, once = _drill(), os.environ.get(ONCE)
    if drill is None or drill[0] not in ("exit", "hang") or not once or step is None:
        return
    kind, where = drill
    if (where + [0])[:3] != [step, worker, rank]:
        return
    try:
        os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    if kind == "exit":
        os._exit(1)
    os.kill(os.getpid(), signal.SIGSTOP)  # a hang the process cannot notice itself: only a timeout finds it


def poison(batch: TaskBatch | TaskList, step: int | None, slots: Sequence[int]) -> TaskBatch | TaskList:
    """The nan drill: episode (step, slot)'s query inputs replaced by NaN where the drill names one of `slots`."""
    drill = _drill()
    if drill is None or drill[0] != "nan" or step is None or drill[1][:1] != [step] or drill[1][1] not in slots:
        return batch
    at = list(slots).index(drill[1][1])
    if isinstance(batch, TaskList):  # episodes of different shapes
        tasks = batch.tasks()
        tasks[at] = dataclasses.replace(tasks[at], query_x=torch.full_like(tasks[at].query_x, float("nan")))
        return TaskList(tuple(tasks))
    query_x = batch.query_x.clone()
    query_x[at] = float("nan")
    return dataclasses.replace(batch, query_x=query_x)
