"""What a worker measures about each call: wall seconds by phase, and how far the call raised the process's peak
resident memory (the kernel's high-water mark VmHWM, reset through /proc/self/clear_refs; Linux only, else None).
Reported with every WorkResult, so per-worker memory shows up in W&B beside the step times."""

from __future__ import annotations

import time


def status_kib(field: str) -> int | None:
    """A `/proc/self/status` field in KiB (VmRSS, VmHWM), or None where there is no /proc."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
    except (OSError, StopIteration):
        return None


def reset_peak() -> int | None:
    """Resets the peak mark to the resident set now and returns that (KiB)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return status_kib("VmRSS")


class CallMeter:
    """`with CallMeter() as m: ...; m.lap('data') ...`: seconds per phase and the peak-memory rise of the call."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self.peak_bytes: int | None = None

    def __enter__(self) -> "CallMeter":
        self._base = reset_peak()
        self._last = time.perf_counter()
        return self

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + now - self._last
        self._last = now

    def __exit__(self, *exc: object) -> None:
        peak = status_kib("VmHWM")
        if self._base is not None and peak is not None:
            self.peak_bytes = max(peak - self._base, 0) * 1024
