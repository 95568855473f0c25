"""Writes that matter (checkpoints, shard indexes, the submitted-jobs file), made atomic: a reader, or a run after a
crash, sees the old file or the new one, never half of one.

Temporary files and folders here get the modes any other new file gets (0o666 and 0o777 less the umask), not
tempfile's owner-only 0o600 and 0o700: they are renamed into place and become the result, which pods running as
another user on a shared volume must be able to read when the umask allows it.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Callable, TypeVar

T = TypeVar("T")


def fsync_path(path: str | Path) -> None:
    """Flushes a file's or a directory's entries to disk (a rename is durable once its directory is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unique(parent: Path, prefix: str, suffix: str, create: Callable[[Path], T]) -> T:
    """create(parent / prefix<random>suffix) for a random name that does not exist yet (create must fail with
    FileExistsError on one that does, as O_EXCL and mkdir do)."""
    for _ in range(100):
        try:
            return create(parent / f"{prefix}{secrets.token_hex(6)}{suffix}")
        except FileExistsError:
            continue
    raise FileExistsError(f"{parent}: no unused temporary name {prefix}*{suffix} after 100 tries")


def make_temp_dir(parent: str | Path, prefix: str) -> Path:
    """A new, uniquely named folder in `parent`, mode 0o777 less the umask."""

    def mkdir(path: Path) -> Path:
        path.mkdir(0o777)
        return path

    return _unique(Path(parent), prefix, "", mkdir)


def atomic_write(path: str | Path, data: bytes) -> None:
    """`data` under a unique temporary name beside `path` (mode 0o666 less the umask), synced, renamed over `path`,
    the directory synced; the temporary file is removed if anything fails."""
    path = Path(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    tmp, fd = _unique(path.parent, f".{path.name}.", ".tmp", lambda p: (p, os.open(p, flags, 0o666)))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
