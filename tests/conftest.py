"""Shared test set-up: one torch thread (2-core machines shared with other processes), small deterministic helpers."""

from __future__ import annotations

import os

# Before anything imports ray (it reads this at import): keep every Ray component on 127.0.0.1 (FIELD-NOTES).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(1)


@pytest.fixture
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture
def http_server():
    """Serves a directory over real HTTP on 127.0.0.1 (object stores' https:// endpoints read the same way through
    fsspec); returns a function dir -> base URL. Every server it starts is shut down after the test."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    servers = []

    def serve(directory) -> str:
        server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(directory)))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def cli(capsys):
    """Runs `metascale ARGS` in-process through main(), as the console script does; returns (exit code, out, err)."""
    import sys

    from metascale.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        argv = sys.argv
        sys.argv = ["metascale", *args]
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        finally:
            sys.argv = argv
        out, err = capsys.readouterr()
        return code, out, err

    return run
