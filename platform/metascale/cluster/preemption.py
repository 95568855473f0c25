"""Preemption: SIGTERM (what Kubernetes, Slurm and `metascale cancel` send first) asks for a checkpoint and a clean
exit after the current meta-step, so a preempted job loses at most one step. Used by both training loops."""

from __future__ import annotations

import signal
from typing import Any


class StopRequest:
    def __init__(self) -> None:
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, *_: Any) -> None:
        self.requested = True

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)
