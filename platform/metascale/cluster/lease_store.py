"""The storage side of the checkpoint-directory lease (cluster/lease.py): exclusive create, read, atomic replace and
compare-then-delete of small files in the checkpoint directory, on local disk (os calls) or any fsspec store; and how
to tell whether the process that wrote a lease still runs on this machine."""

from __future__ import annotations

import getpass
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from metascale.cluster.storage import url_to_fs
from metascale.files import atomic_write, fsync_path

NAME = ".lease"
LOCK = ".lease.takeover"
# Stores whose `pipe_file(mode="create")` is a real conditional create; any other non-local store is read back after
# UNSURE_SETTLE_S so that a racing plain write has landed before we compare tokens.
CONDITIONAL = {"memory", "s3", "s3a", "gs", "gcs", "abfs", "abfss", "az"}


def read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks since boot) of a process, from /proc; None where there is no /proc."""
    text = read_text(f"/proc/{pid}/stat")
    if not text:
        return None
    fields = text[text.rfind(")") + 2 :].split()  # the command name may hold spaces and parentheses
    return (fields[0], fields[19]) if len(fields) > 19 else None


def this_machine() -> dict[str, Any]:
    """What makes "the same machine, the same pid space": the hostname alone is not enough (containers with host
    networking share it across pid namespaces; two machines may both call themselves `localhost`)."""
    try:
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pidns = None
    return {"host": socket.gethostname(), "boot": read_text("/proc/sys/kernel/random/boot_id"), "pidns": pidns}


def user_name() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - containers without a passwd entry for the uid
        return f"uid{os.getuid()}"


def still_running(pid: int, start: str | None) -> bool:
    """Whether `pid` on this machine is still the process that took the lease (started at `start`, when known)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, another user's
    except OSError:
        return True  # cannot tell: assume alive, the ttl still applies
    stat = proc_stat(pid)
    if stat is None:
        return True
    state, started = stat
    return state != "Z" and (start is None or started == start)


@dataclass
class Seen:
    """One read of the lease file: its raw bytes and, when they parse, its fields."""

    raw: bytes
    info: dict[str, Any] | None
    mtime: float | None


class LeaseStore:
    """The few operations a lease needs, on local disk (os calls) or any other fsspec filesystem. `name` is a file in
    the checkpoint directory: the lease itself, or the take-over lock."""

    def __init__(self, directory: str):
        self.fs, root = url_to_fs(directory)
        self.dir = root.rstrip("/") or "/"
        self.local = isinstance(self.fs, LocalFileSystem)
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        # A filesystem may say itself whether its create is conditional (storage.S3FileSystem does); fsspec's
        # ArrowFSWrapper also calls itself "s3" but only checks "exists?" before it writes.
        said = getattr(self.fs, "conditional_create", None)
        self.conditional = self.local or (
            said
            if isinstance(said, bool)
            else bool(CONDITIONAL.intersection(protocols)) and type(self.fs).__name__ != "ArrowFSWrapper"
        )

    def at(self, name: str) -> str:
        return f"{self.dir.rstrip('/')}/{name}"

    def makedirs(self) -> None:
        self.fs.makedirs(self.dir, exist_ok=True)

    def create(self, name: str, data: bytes) -> bool:
        """Exclusive create; False if the file exists."""
        path = self.at(name)
        if self.local:
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            fsync_path(self.dir)
            return True
        try:
            self.fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        return True

    def read(self, name: str = NAME) -> Seen | None:
        """The file as it is now; None if there is none. A file caught between its exclusive create and its write
        (local disk) reads empty: re-read briefly before calling it unreadable."""
        path = self.at(name)
        for attempt in range(5):
            try:
                if self.local:
                    with open(path, "rb") as f:
                        raw = f.read()
                        mtime = os.fstat(f.fileno()).st_mtime
                else:
                    raw, mtime = self.fs.cat_file(path), None
            except FileNotFoundError:
                return None
            try:
                info = json.loads(raw)
                if (
                    isinstance(info, dict)
                    and isinstance(info.get("token"), str)
                    and "renewed" in info
                    and all(isinstance(info.get(k, 0.0), (int, float)) for k in ("renewed", "ttl_s"))
                ):
                    return Seen(raw, info, mtime)
            except ValueError:
                pass
            time.sleep(0.05 * (attempt + 1))
        if mtime is None:
            try:
                mtime = self.fs.modified(path).timestamp()
            except Exception:  # noqa: BLE001 - many stores cannot tell
                mtime = None
        return Seen(raw, None, mtime)

    def replace(self, name: str, data: bytes) -> None:
        """Replaces the file's content atomically: a reader sees the old bytes or the new ones, never a mix and never
        no file (temp + fsync + rename locally; elsewhere temp + move, a server-side copy on object stores)."""
        if self.local:
            atomic_write(self.at(name), data)
            return
        tmp = self.at(f"{name}.tmp-{uuid.uuid4().hex}")
        self.fs.pipe_file(tmp, data)
        self.fs.mv(tmp, self.at(name))

    def remove_if(self, name: str, raw: bytes | None = None, token: str | None = None) -> bool:
        """Deletes the file if it holds exactly `raw` (or, given `token`, that token); True if it did. Read, compare,
        delete: not atomic, so only used where nobody else may change the file in between (our own lease at
        release, our own take-over lock, a dead run's take-over lock)."""
        seen = self.read(name)
        if seen is None or (seen.raw != raw if token is None else (seen.info or {}).get("token") != token):
            return False
        try:
            if self.local:
                os.unlink(self.at(name))
                fsync_path(self.dir)
            else:
                self.fs.rm_file(self.at(name))
        except FileNotFoundError:
            return False
        return True
