"""Reads the records of a W&B run file (`run-<id>.wandb`): what a job logged, from its own files, without network.

Every W&B run, offline or online, writes this transaction log under `<logging.wandb.dir>/wandb/` (offline runs in
`offline-run-<time>-<id>/`, online ones in `run-<time>-<id>/`). wandb 0.31 writes it from its Go core and ships no
Python reader; the format is LevelDB's log format (32 KiB blocks, 7-byte chunk headers: crc32, length, type) after a
7-byte file header, each record a `wandb_internal_pb2.Record`. `metascale plot` and the tests read runs through here.
"""

from __future__ import annotations

import glob
import json
import os
import struct
from pathlib import Path
from typing import Any

BLOCK = 32768


def records(path: str | Path) -> list[Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B run file")
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
    """The offline run files under a `logging.wandb.dir` (what the tests' offline runs write)."""
    return sorted(glob.glob(f"{wandb_dir}/wandb/offline-run-*/run-*.wandb"))


def find_run_files(where: str | Path) -> list[str]:
    """The run files of the newest run found at `where`, oldest first: a run file itself, a run's folder
    (`offline-run-*` or `run-*`), or a folder above them (`logging.wandb.dir`, or its `wandb/`). A resumed run writes
    one file per session under the same id: they are all returned, in the order they were written."""
    where = Path(where)
    if where.is_file():
        return [str(where)]
    found = [
        Path(p)
        for pattern in ("run-*.wandb", "*run-*/run-*.wandb", "wandb/*run-*/run-*.wandb")
        for p in glob.glob(str(where / pattern))
    ]
    if not found:
        return []
    found.sort(key=lambda p: (p.parent.name.split("run-", 1)[-1], os.path.getmtime(p)))  # YYYYmmdd_HHMMSS-id
    newest = run_id(found[-1])
    return [str(p) for p in found if run_id(p) == newest]


def history(path: str | Path) -> list[dict]:
    rows = []
    for rec in records(path):
        if rec.WhichOneof("record_type") == "history":
            rows.append(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in rec.history.item}
            )
    return rows


def run_info(path: str | Path) -> dict[str, Any]:
    """The run's identity as `wandb.init` set it: id, project, name, group, job type, tags, notes and its config."""
    for rec in records(path):
        if rec.WhichOneof("record_type") == "run":
            r = rec.run
            return {
                "id": r.run_id,
                "project": r.project,
                "name": r.display_name,
                "group": r.run_group,
                "job_type": r.job_type,
                "tags": list(r.tags),
                "notes": r.notes,
                "config": {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.config.update
                },
            }
    raise ValueError(f"{path}: no run record")


def artifacts(path: str | Path) -> list[dict[str, Any]]:
    """The artifact versions the run logged, in order: name, type, aliases, metadata and the paths of its files."""
    out = []
    for rec in records(path):
        if rec.WhichOneof("record_type") == "artifact":
            a = rec.artifact
            out.append(
                {
                    "name": a.name,
                    "type": a.type,
                    "aliases": list(a.aliases),
                    "metadata": json.loads(a.metadata) if a.metadata else {},
                    "files": [entry.path for entry in a.manifest.contents],
                }
            )
    return out


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


def settled(path: str | Path, timeout_s: float = 30.0) -> str:
    """`path` once it holds the run's exit record (written by finish()), waiting up to `timeout_s`: the core process
    writes the file behind the client, so right after finish() the last records may not be there yet."""
    import time

    from google.protobuf.message import DecodeError

    def exited() -> bool:
        try:
            return any(rec.WhichOneof("record_type") == "exit" for rec in records(path))
        except DecodeError:  # caught mid-write: the last record is still partial
            return False

    deadline = time.monotonic() + timeout_s
    while not exited() and time.monotonic() < deadline:
        time.sleep(0.2)
    return str(path)
