"""Reads the records of an offline W&B run file (`run-<id>.wandb`), to check what a job logged.

wandb 0.31 writes these from its Go core and ships no Python reader; the format is LevelDB's log format (32 KiB
blocks, 7-byte chunk headers: crc32, length, type) after a 7-byte file header, each record a `wandb_internal_pb2.Record`.
"""

from __future__ import annotations

import glob
import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32768


def records(path: str | Path) -> list[pb.Record]:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", "not a W&B run file"
    out, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        room = BLOCK - pos % BLOCK
        if room < 7:
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += room
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(pending)
            out.append(rec)
            pending = b""
    return out


def run_files(wandb_dir: str | Path) -> list[str]:
    return sorted(glob.glob(f"{wandb_dir}/wandb/offline-run-*/run-*.wandb"))


def history(path: str | Path) -> list[dict]:
    rows = []
    for rec in records(path):
        if rec.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in rec.history.item})
    return rows


def run_id(path: str | Path) -> str:
    """From the file name (`run-<id>.wandb`), which exists even when the process was killed before flushing."""
    return Path(path).name.removeprefix("run-").removesuffix(".wandb")


def settled_history(path: str | Path, key: str, timeout_s: float = 30.0) -> list[dict]:
    """`history(path)` once some row holds `key`, waiting up to `timeout_s`: wandb's core process writes the file
    behind the client, and on a loaded machine one run file was read with no history rows yet after finish()."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        rows = history(path)
        if any(key in row for row in rows) or time.monotonic() > deadline:
            return rows
        time.sleep(0.5)
