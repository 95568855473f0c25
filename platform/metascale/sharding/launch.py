"""A rank group: N processes (spawned, one per GPU; gloo on CPU) joined in one torch.distributed group on 127.0.0.1,
driven from the parent by calls that every rank runs in lockstep.

`group.call(fn, *args)` sends a picklable top-level function to every rank and returns each rank's result (rank
order). State that outlives a call (the engine, the meta-parameters) lives in `RANK_STATE` inside each rank. A rank
that raises, or dies, fails the call with its traceback's last line: the others may be blocked in a collective, so
the whole group is ended (by the pids it started) rather than left hanging.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import socket
import traceback
from multiprocessing.connection import Connection, wait
from typing import Any, Callable

from metascale.errors import MetascaleError

RANK_STATE: dict[str, Any] = {}  # per rank process: what calls leave for later calls


class RankGroupError(MetascaleError):
    exit_code = 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, conn: Connection, env: dict[str, str], threads: int) -> None:
    # A preemption's SIGTERM (often sent to the whole process group) is the driver's to handle: it has the ranks
    # write their checkpoint shards, then ends them. A rank whose driver dies sees its pipe close and exits.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.update(env)
    import logging
    import warnings

    import torch

    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")  # DeepSpeed's gloo calls
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)

    torch.set_num_threads(threads)
    from metascale.sharding.engine import init_process_group

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    try:
        init_process_group(rank, world, port, backend)
        RANK_STATE.update(rank=rank, world=world)
        conn.send(("ok", None))
        while True:
            msg = conn.recv()
            if msg is None:
                break
            fn, args = msg
            try:
                conn.send(("ok", fn(*args)))
            except Exception as e:  # noqa: BLE001 - reported to the parent, which ends the group
                conn.send(("error", f"rank {rank}: {type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()  # without it ~2 in 12 two-rank runs aborted at exit (FIELD-NOTES)
        conn.close()


class RankGroup:
    def __init__(self, world: int, threads: int = 1, env: dict[str, str] | None = None, timeout_s: float = 600):
        ctx = mp.get_context("spawn")
        port = free_port()
        self.world, self.timeout_s = world, timeout_s
        self.conns: list[Connection] = []
        self.procs: list[Any] = []
        env = {"OMP_NUM_THREADS": str(threads), **(env or {})}
        for rank in range(world):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_rank_main, args=(rank, world, port, child, env, threads), daemon=True)
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)
        self._gather("start-up")

    def call(self, fn: Callable[..., Any], *args: Any) -> list[Any]:
        for conn in self.conns:
            conn.send((fn, args))
        return self._gather(getattr(fn, "__name__", str(fn)))

    def _gather(self, what: str) -> list[Any]:
        results: dict[int, Any] = {}
        pending = {conn: rank for rank, conn in enumerate(self.conns)}
        while pending:
            ready = wait(list(pending) + [p.sentinel for p in self.procs], timeout=self.timeout_s)
            if not ready:
                self.close(force=True)
                raise RankGroupError(f"rank group: '{what}' did not finish within {self.timeout_s:.0f} s")
            for conn in [c for c in ready if c in pending]:
                rank = pending.pop(conn)
                try:
                    status, value = conn.recv()
                except EOFError:
                    status, value = "error", f"rank {rank} exited (code {self.procs[rank].exitcode})"
                if status == "error":
                    self.close(force=True)
                    raise RankGroupError(f"rank group: '{what}' failed on {value.strip().splitlines()[0]}\n{value}")
                results[rank] = value
            dead = [r for r in pending.values() if not self.procs[r].is_alive() and not self.conns[r].poll()]
            if dead:
                self.close(force=True)
                raise RankGroupError(f"rank group: rank {dead[0]} exited (code {self.procs[dead[0]].exitcode}) "
                                     f"during '{what}'")
        return [results[r] for r in range(self.world)]

    def close(self, force: bool = False) -> None:
        for conn in self.conns:
            try:
                if not force:
                    conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        for proc in self.procs:
            proc.join(timeout=1 if force else 60)
            if proc.is_alive():
                proc.kill()  # only the processes this group started, by their handle
                proc.join()
        for conn in self.conns:
            conn.close()
        self.conns, self.procs = [], []

    def __enter__(self) -> "RankGroup":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close(force=exc[0] is not None)
