"""Preemption and Ctrl-C: SIGTERM (what Kubernetes, Slurm and `metascale cancel` send first) and a first SIGINT
(Ctrl-C) ask for a checkpoint and a clean exit after the current meta-step, so a stopped job loses at most one step.
A second Ctrl-C exits at once (exit code 130), for a user who does not want to wait for the step."""

from __future__ import annotations

import signal
import sys
from typing import Any


class StopRequest:
    def __init__(self) -> None:
        self.requested: str | None = None  # the signal's name once one arrived
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum: int, _frame: Any) -> None:
        if signum == signal.SIGINT and self.requested == "SIGINT":
            raise KeyboardInterrupt  # the second Ctrl-C: leave now
        self.requested = signal.Signals(signum).name
        if signum == signal.SIGINT:
            print(
                "stopping after this meta-step, with a checkpoint (Ctrl-C again to exit at once)",
                file=sys.stderr,
                flush=True,
            )

    def restore(self) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
