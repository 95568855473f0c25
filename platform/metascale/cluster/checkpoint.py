"""Checkpoints: atomic, checksummed, to a local path or any fsspec URL; a torn or corrupt latest falls back.

File layout: `<dir>/step-00000100.ckpt` = a header line `metascale-ckpt v1 sha256=<hex>\n` then the torch.save
payload. Written to a temporary name in the same directory, flushed and fsynced, then renamed, so a reader never sees
half a checkpoint under a real name; the checksum catches what the rename cannot (a disk or copy that corrupted it).
Payloads load with `weights_only=True`: a checkpoint is data, never code.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import uuid
from typing import Any

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem

from metascale.errors import CheckpointError
from metascale.files import atomic_write

log = logging.getLogger(__name__)
MAGIC = b"metascale-ckpt v1 sha256="
NAME = re.compile(r"step-(\d{8})\.ckpt$")


def _fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path.rstrip("/")


def save(directory: str, step: int, state: dict[str, Any], keep: int) -> str:
    """Writes `state` as the checkpoint of `step` and prunes all but the newest `keep`. Returns its path."""
    fs, root = _fs(directory)
    fs.makedirs(root, exist_ok=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    blob = MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload
    final = f"{root}/step-{step:08d}.ckpt"
    if isinstance(fs, LocalFileSystem):
        atomic_write(final, blob)
    else:  # object stores: a single PUT is atomic; write under a temp name then move for stores that copy
        tmp = f"{root}/.tmp-{uuid.uuid4().hex}.ckpt"
        with fs.open(tmp, "wb") as f:
            f.write(blob)
        fs.mv(tmp, final)
    for old in list_steps(directory)[:-keep]:
        fs.rm(f"{root}/step-{old:08d}.ckpt")
    return final


def list_steps(directory: str) -> list[int]:
    fs, root = _fs(directory)
    if not fs.exists(root):
        return []
    return sorted(int(m.group(1)) for p in fs.ls(root, detail=False) if (m := NAME.search(p)))


def read(path: str) -> dict[str, Any]:
    """Loads one checkpoint file, verifying its checksum; raises CheckpointError naming what is wrong."""
    fs, p = _fs(path)
    try:
        with fs.open(p, "rb") as f:
            blob = f.read()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint file") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a directory; pass one step-NNNNNNNN.ckpt file in it") from None
    except (NotADirectoryError, PermissionError) as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
    header, sep, payload = blob.partition(b"\n")
    if not blob.startswith(MAGIC[: len(blob)]) or not header.startswith(MAGIC):
        raise CheckpointError(f"{path}: not a metascale checkpoint (bad header)")
    if not sep:
        raise CheckpointError(f"{path}: truncated before its checksum (torn write)")
    if hashlib.sha256(payload).hexdigest().encode() != header[len(MAGIC) :]:
        raise CheckpointError(f"{path}: checksum mismatch (torn or corrupt write)")
    try:
        state = torch.load(io.BytesIO(payload), weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        # torch's messages run to several lines (weights_only explains itself at length): the first says what failed.
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path}: payload does not load ({reason})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: payload is a {type(state).__name__}, not a checkpoint's state dict")
    return state


def load_latest(directory: str) -> tuple[int, dict[str, Any]] | None:
    """The newest checkpoint that verifies; each bad newer one is reported with a warning and skipped."""
    for step in reversed(list_steps(directory)):
        try:
            return step, read(f"{directory.rstrip('/')}/step-{step:08d}.ckpt")
        except CheckpointError as e:
            log.warning("skipping checkpoint: %s; falling back to the previous one", e)
    return None
