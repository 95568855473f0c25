"""Where shards live: a local path, any fsspec URL (file://, s3://, gs://, ...) or a `pipe:` command template.

A `pipe:` root holds `{name}` where a file name goes, e.g. `pipe:aws s3 cp s3://bucket/set/{name} -`. The template
is split into an argument vector once (shell-style quoting, `shlex.split`), `{name}` is replaced inside each argument,
and the command runs without a shell: a file name read from a set's index is never parsed by a shell, whatever
characters it holds. A template that needs a shell says so itself and passes the name as an argument:
`pipe:sh -c 'curl -fsS "https://host/set/$1" | zstd -d' sh {name}`.
"""

from __future__ import annotations

import io
import shlex
import subprocess
from typing import BinaryIO

from metascale.errors import DataError


def join(root: str, name: str) -> str:
    if root.startswith("pipe:"):
        return "pipe:" + shlex.join(a.replace("{name}", name) for a in _template(root))
    return root.rstrip("/") + "/" + name


def _template(root: str) -> list[str]:
    try:
        argv = shlex.split(root.removeprefix("pipe:"))
    except ValueError as e:
        raise DataError(f"pipe: source '{root}' is not a valid command ({e})") from None
    if not any("{name}" in a for a in argv):
        raise DataError(f"pipe: source '{root}' needs a '{{name}}' placeholder for the file name")
    return argv


def open_stream(url: str) -> BinaryIO:
    """Opens a file for streaming reads; raises FileNotFoundError for a missing local file."""
    if url.startswith("pipe:"):
        return io.BufferedReader(_run(shlex.split(url.removeprefix("pipe:"))), 1 << 16)
    if "://" not in url or url.startswith("file://"):
        return open(url.removeprefix("file://"), "rb")
    import fsspec

    return fsspec.open(url, "rb").open()


def read_bytes(url: str) -> bytes:
    with open_stream(url) as f:
        data = f.read()
    if url.startswith("pipe:") and not data:
        raise FileNotFoundError(url)
    return data


def _run(argv: list[str]) -> _CommandOutput:
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, shell=False)
    except OSError as e:  # not FileNotFoundError: a missing program is not a missing file
        raise OSError(f"cannot run '{argv[0]}': {e.strerror}") from None
    return _CommandOutput(proc, argv[0])


class _CommandOutput(io.RawIOBase):
    """The standard output of a command run from an argument vector (shell=False). A command that ends with a
    non-zero status is an OSError at the end of its output, so a failed download never passes for a short file."""

    def __init__(self, proc: subprocess.Popen, program: str):
        self.proc, self.program = proc, program

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self.proc.stdout.readinto(b)
        if n == 0 and len(b) and self.proc.wait() != 0:
            raise OSError(f"'{self.program}' exited with status {self.proc.returncode}")
        return n

    def close(self) -> None:
        if not self.closed:
            self.proc.stdout.close()
            if self.proc.poll() is None:  # a reader that stopped early: the rest of the output is not wanted
                self.proc.kill()
            self.proc.wait()
        super().close()
