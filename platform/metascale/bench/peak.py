"""Peak memory of one computation, measured the same way by every benchmark.

The figure is the resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs) over the resident set
just before the computation, taken in a fresh interpreter so that no earlier measurement leaves allocator state
behind. Linux only (it reads /proc).
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import subprocess
import sys
from typing import Any


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def settle() -> int:
    """Frees what can be freed, resets the peak mark; returns the resident set now (KiB)."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS")


def added_bytes(base_kib: int) -> int:
    """Bytes the peak rose above `base_kib` (from `settle()`)."""
    return (_status_kib("VmHWM") - base_kib) * 1024


def in_fresh_process(target: str, **kwargs) -> float:
    """Runs `module:function(**kwargs)` in a new interpreter (one torch thread) and returns the number it returns."""
    return float(fresh_process_json(target, **kwargs))


def fresh_process_json(target: str, **kwargs) -> Any:
    """Runs `module:function(**kwargs)` in a new interpreter (one torch thread) and returns what it returns (JSON).

    glibc is told to serve every allocation over 64 KiB with its own mmap and to give freed memory back at once, so
    the resident set follows the live tensors (with its defaults, freed blocks stay resident and the figure measures
    the allocator's history instead)."""
    code = (
        "import importlib, json, sys; mod, fn = sys.argv[1].split(':'); "
        "print(json.dumps(getattr(importlib.import_module(mod), fn)(**json.loads(sys.argv[2]))))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    out = subprocess.run(
        [sys.executable, "-c", code, target, json.dumps(kwargs)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=1800,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])
