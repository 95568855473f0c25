"""Checkpoints: a folder per step that other tools can read, written atomically and checksummed, to a local path,
`s3://` or any other fsspec URL (cluster/storage.py); a torn or corrupt newest checkpoint is reported with a warning
and the newest good one is used.

Layout (format version 2):

    <checkpoint.dir>/
      .lease                    the run's lease (cluster/lease.py): not a checkpoint, ignored here
      step-00000100/
        params.safetensors      the meta-parameters by name: `safetensors.torch.load_file` reads them
        state.pt                the rest that holds tensors (optimiser state, torch's RNG): torch.load(weights_only=True)
        manifest.json           written last: format, version, step, skipped steps, W&B run id, the spec (YAML), the
                                sha256 and size of every other file, and the sha256 of the manifest itself
      step-00000090.ckpt        format 1 (one file: a checksum header, then a torch payload): still read, never written

The commit point is the manifest: a checkpoint counts only once its `manifest.json` exists, and it is written after
every file it names, so a writer killed at any moment leaves either a whole checkpoint or one without a manifest,
which is neither listed nor loaded (and is removed by the next save). On local disk the files are written and
fsynced in a temporary folder `.tmp-step-...` beside the others, which is renamed to its real name once complete
(and the parent fsynced): a reader never even sees an incomplete folder. On object stores, where a "folder" is a key
prefix and there is no rename, each file is one PUT (atomic per object: a reader sees all of it or none of it) and
the manifest is the last PUT; re-writing a step first deletes that step's old manifest. Every file is verified
against the manifest's sha256 and size on read, and the manifest against its own checksum, so what a rename or a
PUT cannot prevent (a disk, a copy or an upload that corrupted or truncated a file) is caught: `read` raises a
one-line CheckpointError, and `load_latest` warns and falls back to the previous checkpoint. Payloads load as data,
never code: safetensors, and torch.load with `weights_only=True`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import secrets
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem

from metascale.cluster.storage import url_to_fs
from metascale.errors import CheckpointError
from metascale.files import fsync_path, make_temp_dir

log = logging.getLogger(__name__)

FORMAT = "metascale-checkpoint"
VERSION = 2
MANIFEST = "manifest.json"
PARAMS = "params.safetensors"
STATE = "state.pt"
STEP = re.compile(r"^step-(\d{8})$")
TMP = ".tmp-"  # temporary folders of a write in progress (or of a writer that died), and folders being deleted
# Manifest keys of its own; the state's other JSON scalars (spec, wandb_run_id, skipped_steps) sit beside them.
RESERVED = frozenset({"format", "version", "step", "created", "files", "manifest_sha256"})
FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")

# Format 1, read for runs checkpointed before format 2: `step-NNNNNNNN.ckpt`, this header line, the torch payload.
MAGIC = b"metascale-ckpt v1 sha256="
LEGACY = re.compile(r"^step-(\d{8})\.ckpt$")


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def _base(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _manifest_sha256(manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return _sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


# -- writing -------------------------------------------------------------------------------------------------------


def encode(step: int, state: dict[str, Any]) -> dict[str, bytes]:
    """The files of one checkpoint, {name: bytes}, the manifest last: `params` (a dict of tensors) to safetensors,
    the state's JSON scalars (str, int, float, bool, None) to the manifest, everything else to the torch file."""
    from safetensors.torch import save as save_safetensors

    scalars: dict[str, Any] = {}
    rest: dict[str, Any] = {}
    for key, value in state.items():
        if key in ("params", "step"):
            continue
        if value is None or isinstance(value, (str, bool, int, float)):
            scalars[key] = value
        else:
            rest[key] = value
    clash = RESERVED.intersection(scalars)
    if clash:
        raise ValueError(f"checkpoint state keys {sorted(clash)} are the manifest's own")
    files: dict[str, bytes] = {}
    if state.get("params") is not None:
        tensors = {k: v.detach().contiguous() for k, v in state["params"].items()}
        files[PARAMS] = save_safetensors(tensors, metadata={"format": "pt", "metascale.step": str(step)})
    if rest:
        buf = io.BytesIO()
        torch.save(rest, buf)
        files[STATE] = buf.getvalue()
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "step": step,
        **scalars,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "files": {name: {"sha256": _sha256(data), "bytes": len(data)} for name, data in files.items()},
    }
    manifest["manifest_sha256"] = _manifest_sha256(manifest)
    files[MANIFEST] = json.dumps(manifest, indent=1).encode() + b"\n"
    return files


def save(directory: str, step: int, state: dict[str, Any], keep: int) -> str:
    """Writes `state` as the checkpoint of `step` and prunes all but the newest `keep`. Returns its path (the step
    folder, under `directory` as given)."""
    fs, root = url_to_fs(directory)
    files = encode(step, state)
    name = step_name(step)
    if isinstance(fs, LocalFileSystem):
        _write_local(Path(root), name, files)
    else:
        _write_remote(fs, root, name, files)
    _prune(fs, root, keep)
    return f"{directory.rstrip('/')}/{name}"


def _write_local(root: Path, name: str, files: dict[str, bytes]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(root, f"{TMP}{name}-")
    old: Path | None = None
    try:
        for file, data in files.items():  # the manifest last
            with open(tmp / file, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        fsync_path(tmp)
        final = root / name
        if final.exists() or final.is_symlink():  # this step again (after a fall-back past a bad newer copy)
            old = root / f"{TMP}old-{name}-{secrets.token_hex(6)}"
            os.rename(final, old)
        os.rename(tmp, final)
        fsync_path(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        _rmtree(old)


def _write_remote(fs: Any, root: str, name: str, files: dict[str, bytes]) -> None:
    folder = f"{root}/{name}"
    fs.makedirs(folder, exist_ok=True)
    manifest = f"{folder}/{MANIFEST}"
    if fs.exists(manifest):  # un-commit an older checkpoint of this step before its files are replaced
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(manifest)
    for file, data in files.items():  # one PUT each, the manifest last
        fs.pipe_file(f"{folder}/{file}", data)


def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    if path.exists() and not path.is_dir():
        path.unlink(missing_ok=True)


def _remove(fs: Any, root: str, name: str) -> None:
    """Deletes one entry: a step folder loses its manifest first (locally: is renamed away first), so no reader
    takes a half-deleted folder for a checkpoint."""
    path = f"{root}/{name}"
    if isinstance(fs, LocalFileSystem):
        p = Path(path)
        if p.is_dir() and not name.startswith(TMP):
            trash = p.with_name(f"{TMP}old-{name}-{secrets.token_hex(6)}")
            with contextlib.suppress(FileNotFoundError):
                os.rename(p, trash)
                p = trash
        if p.is_dir():
            _rmtree(p)
        else:
            p.unlink(missing_ok=True)
        return
    if STEP.match(name):
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(f"{path}/{MANIFEST}")
    with contextlib.suppress(FileNotFoundError):
        if LEGACY.match(name):
            fs.rm_file(path)
        else:
            fs.rm(path, recursive=True)


def _prune(fs: Any, root: str, keep: int) -> None:
    """Keeps the newest `keep` checkpoints; removes older ones, and what writers that died left (step folders without
    a manifest, temporary folders). Only the run holding the directory's lease writes to it, so nothing here is
    another writer's work in progress."""
    committed, litter = _scan(fs, root)
    for step in sorted(committed)[:-keep]:
        for name in committed[step]:
            _remove(fs, root, name)
    for name in litter:
        _remove(fs, root, name)


# -- listing -------------------------------------------------------------------------------------------------------


def _scan(fs: Any, root: str) -> tuple[dict[int, list[str]], list[str]]:
    """({step: its entries, a step folder before a format-1 file}, [incomplete folders and temporary entries])."""
    committed: dict[int, list[str]] = {}
    litter: list[str] = []
    try:
        entries = fs.ls(root, detail=False)
    except (FileNotFoundError, NotADirectoryError):
        return committed, litter
    for entry in sorted(entries):
        name = _base(entry)
        if m := STEP.match(name):
            if fs.exists(f"{root}/{name}/{MANIFEST}"):
                committed.setdefault(int(m.group(1)), []).insert(0, name)
            else:
                litter.append(name)
        elif m := LEGACY.match(name):
            committed.setdefault(int(m.group(1)), []).append(name)
        elif name.startswith(TMP):
            litter.append(name)
    return committed, litter


def list_steps(directory: str) -> list[int]:
    """The steps that have a checkpoint (committed: its manifest written; not yet verified) in `directory`."""
    fs, root = url_to_fs(directory)
    return sorted(_scan(fs, root)[0])


# -- reading -------------------------------------------------------------------------------------------------------


def read(path: str) -> dict[str, Any]:
    """Loads one checkpoint (a step folder, its manifest.json, or a format-1 `.ckpt` file), verifying every checksum;
    raises a one-line CheckpointError naming what is wrong."""
    fs, p = url_to_fs(path)
    if _base(p) == MANIFEST:
        p = p.rstrip("/").rsplit("/", 1)[0]
    try:
        kind = fs.info(p)["type"]
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint file or folder") from None
    except (NotADirectoryError, PermissionError) as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
    if kind == "directory":
        return _read_folder(fs, p, path)
    return _read_legacy(fs, p, path)


def _cat(fs: Any, path: str, what: str) -> bytes:
    try:
        return fs.cat_file(path)
    except (IsADirectoryError, NotADirectoryError, PermissionError) as e:
        raise CheckpointError(f"{what}: cannot be read ({e.strerror or e})") from None


def _read_folder(fs: Any, p: str, path: str) -> dict[str, Any]:
    try:
        raw = _cat(fs, f"{p}/{MANIFEST}", path)
    except FileNotFoundError:
        raise CheckpointError(
            f"{path}: is a directory without a {MANIFEST}: not a checkpoint, or one whose write did not finish "
            "(pass a step-NNNNNNNN folder of a checkpoint directory)"
        ) from None
    manifest = _manifest(raw, path)
    blobs: dict[str, bytes] = {}
    for name, meta in manifest["files"].items():
        try:
            blob = _cat(fs, f"{p}/{name}", path)
        except FileNotFoundError:
            raise CheckpointError(f"{path}: {name} is missing (a torn or partly deleted checkpoint)") from None
        if len(blob) != meta["bytes"]:
            raise CheckpointError(
                f"{path}: {name} has {len(blob)} bytes, its manifest says {meta['bytes']} (torn, "
                "truncated or corrupt write)"
            )
        if _sha256(blob) != meta["sha256"]:
            raise CheckpointError(f"{path}: {name}: checksum mismatch (torn or corrupt write)")
        blobs[name] = blob
    state = {k: v for k, v in manifest.items() if k not in RESERVED}
    state["step"] = manifest["step"]
    if PARAMS in blobs:
        state["params"] = _load_safetensors(blobs[PARAMS], f"{path}: {PARAMS}")
    if STATE in blobs:
        state.update(_load_torch(blobs[STATE], f"{path}: {STATE}"))
    return state


def _manifest(raw: bytes, path: str) -> dict[str, Any]:
    what = f"{path}: {MANIFEST}"
    try:
        manifest = json.loads(raw)
    except ValueError:
        raise CheckpointError(f"{what} is not JSON (torn or corrupt write)") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{what} is not a metascale checkpoint manifest")
    version = manifest.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise CheckpointError(f"{what}: format version {version!r}, this metascale reads up to {VERSION}: upgrade it")
    if manifest.get("manifest_sha256") != _manifest_sha256(manifest):
        raise CheckpointError(f"{what}: checksum mismatch (corrupt or edited)")
    files = manifest.get("files")
    valid = (
        isinstance(manifest.get("step"), int)
        and isinstance(files, dict)
        and all(
            isinstance(n, str)
            and FILE_NAME.match(n)
            and n != MANIFEST
            and isinstance(m, dict)
            and isinstance(m.get("sha256"), str)
            and isinstance(m.get("bytes"), int)
            for n, m in files.items()
        )
    )
    if not valid:
        raise CheckpointError(f"{what}: malformed (step, or the files' names, sizes and checksums)")
    return manifest


def _first_line(e: BaseException) -> str:
    # torch's messages run to several lines (weights_only explains itself at length): the first says what failed.
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _load_safetensors(blob: bytes, what: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load as load_safetensors

    try:
        return load_safetensors(blob)
    except Exception as e:  # noqa: BLE001 - any parse failure means the same thing to the user
        raise CheckpointError(f"{what} does not load ({_first_line(e)})") from None


def _load_torch(blob: bytes, what: str) -> dict[str, Any]:
    try:
        state = torch.load(io.BytesIO(blob), weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        raise CheckpointError(f"{what} does not load ({_first_line(e)})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{what} is a {type(state).__name__}, not a checkpoint's state dict")
    return state


def _read_legacy(fs: Any, p: str, path: str) -> dict[str, Any]:
    """A format-1 file: `metascale-ckpt v1 sha256=<hex>\\n` then the torch payload."""
    try:
        blob = _cat(fs, p, path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint file or folder") from None
    header, sep, payload = blob.partition(b"\n")
    if not blob.startswith(MAGIC[: len(blob)]) or not header.startswith(MAGIC):
        raise CheckpointError(f"{path}: not a metascale checkpoint (bad header)")
    if not sep:
        raise CheckpointError(f"{path}: truncated before its checksum (torn write)")
    if _sha256(payload).encode() != header[len(MAGIC) :]:
        raise CheckpointError(f"{path}: checksum mismatch (torn or corrupt write)")
    return _load_torch(payload, f"{path}: payload")


def load_latest(directory: str) -> tuple[int, dict[str, Any]] | None:
    """The newest checkpoint that verifies; each bad newer one is reported with a warning and skipped."""
    fs, root = url_to_fs(directory)
    committed, _ = _scan(fs, root)
    for step in sorted(committed, reverse=True):
        for name in committed[step]:
            try:
                return step, read(f"{directory.rstrip('/')}/{name}")
            except CheckpointError as e:
                log.warning("skipping checkpoint: %s; falling back to the previous one", e)
    return None


def resolve(path: str) -> tuple[int | None, dict[str, Any]]:
    """What `eval --checkpoint` and `export` accept: one checkpoint (a step folder, its manifest, a format-1 file), or
    a checkpoint directory, whose newest good checkpoint is used. (step, state)."""
    fs, p = url_to_fs(path)
    with contextlib.suppress(FileNotFoundError, NotADirectoryError, PermissionError):
        if fs.info(p)["type"] == "directory" and not fs.exists(f"{p}/{MANIFEST}") and _scan(fs, p)[0]:
            found = load_latest(path)
            if found is None:
                raise CheckpointError(f"{path}: none of its checkpoints is readable (see the warnings above)")
            return found
    state = read(path)
    step = state.get("step")
    return (step if isinstance(step, int) else None), state
