"""The checkpoint-directory lease (cluster/lease.py, issue #17): one run at a time owns a checkpoint directory; a
second run is refused with the owner named; a dead run's lease is taken over (at once on this host, after the ttl
elsewhere); the heartbeat renews it and notices when it has been taken; racing processes never both win."""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pytest

import metascale
from metascale.cluster import checkpoint
from metascale.cluster.lease import Lease, LeaseLost
from metascale.cluster.lease_store import this_machine
from metascale.errors import CheckpointError

PLATFORM = str(Path(metascale.__file__).resolve().parents[1])

# A would-be run: once imported, says "ready" and (if told to) waits for a line on stdin, so that racers start
# together; then tries to take the lease, says "won" and holds it until its stdin closes, or says "refused <message>"
# and exits 2 (CheckpointError's exit code).
CHILD = r"""
import logging, sys, time
logging.basicConfig(level=logging.WARNING, format="%(message)s")
from metascale.cluster.lease import Lease
from metascale.errors import CheckpointError
directory, ttl, wait_for_go = sys.argv[1], float(sys.argv[2]), sys.argv[3] == "1"
print("ready", flush=True)
if wait_for_go:
    sys.stdin.readline()
try:
    lease = Lease.acquire(directory, ttl_s=ttl, heartbeat_s=ttl / 4)
except CheckpointError as e:
    print("refused", e, flush=True)
    sys.exit(e.exit_code)
print("won", flush=True)
sys.stdin.read()
lease.release()
"""


def _spawn(directory, ttl=60.0, go=False) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": PLATFORM, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(directory), str(ttl), "1" if go else "0"],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        bufsize=0,
    )


def _line(proc: subprocess.Popen) -> str:
    """One line of the child's stdout; unbuffered, so that `communicate` later sees everything after it."""
    return proc.stdout.readline().decode().strip()


def _ready(proc: subprocess.Popen) -> subprocess.Popen:
    assert _line(proc) == "ready", proc.communicate(timeout=20)
    return proc


def _child(directory, ttl=60.0) -> subprocess.Popen:
    return _ready(_spawn(directory, ttl))


def _finish(proc: subprocess.Popen, timeout=20) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out.decode().strip(), err.decode().strip()


def _foreign(
    directory,
    renewed_ago: float,
    ttl_s=60.0,
    host="elsewhere.example",
    pid=4242,
    name=".lease",
    user="alice",
    **machine,
) -> None:
    """A lease file (or take-over lock) as a run on another machine would have left it."""
    info = {
        "owner": f"{user}@{host} pid {pid}",
        "token": secrets.token_hex(16),
        "host": host,
        "boot": None,
        "pidns": None,
        "pid": pid,
        "start": None,
        "acquired": time.time() - 3600,
        "renewed": time.time() - renewed_ago,
        "ttl_s": ttl_s,
        "heartbeat_s": ttl_s / 6,
        **machine,
    }
    fs, root = fsspec.core.url_to_fs(str(directory))
    fs.makedirs(root, exist_ok=True)
    fs.pipe_file(f"{root}/{name}", json.dumps(info).encode())


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _lease_json(directory) -> dict:
    fs, root = fsspec.core.url_to_fs(str(directory))
    return json.loads(fs.cat_file(f"{root}/.lease"))


def test_second_acquire_in_another_process_is_refused_naming_the_owner(tmp_path):
    with Lease.acquire(str(tmp_path / "ck")) as lease:
        code, out, _ = _finish(_child(tmp_path / "ck"))
        assert code == 2
        assert out.count("\n") == 0  # one line
        assert out.startswith(f"refused {tmp_path / 'ck'} is in use by run {lease.owner} (renewed ")
        assert f"pid {os.getpid()}" in out and socket.gethostname() in out
        assert "set checkpoint.dir (or the job name) for a new run" in out
        with pytest.raises(CheckpointError, match="is in use by run"):  # and in the same process too
            Lease.acquire(str(tmp_path / "ck"))


def test_release_lets_the_next_run_in(tmp_path):
    lease = Lease.acquire(str(tmp_path / "ck"))
    lease.release()
    assert not (tmp_path / "ck" / ".lease").exists()
    child = _child(tmp_path / "ck")
    assert _line(child) == "won"
    assert _lease_json(tmp_path / "ck")["pid"] == child.pid
    assert _finish(child)[0] == 0  # its stdin closed: it releases and exits
    assert not (tmp_path / "ck" / ".lease").exists()
    with pytest.raises(LeaseLost, match="released"):
        lease.check()


def test_a_sigkilled_run_on_this_host_is_taken_over_at_once(tmp_path, caplog):
    child = _child(tmp_path / "ck", ttl=60.0)
    assert _line(child) == "won"
    child.kill()
    child.communicate(timeout=20)
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, "metascale.cluster.lease"):
        lease = Lease.acquire(str(tmp_path / "ck"), ttl_s=60.0)  # no wait: the ttl would be a minute
    assert time.monotonic() - t0 < 5
    assert f"pid {child.pid} (process {child.pid} no longer runs on this host)" in caplog.text
    lease.release()


def test_a_reused_pid_is_not_the_owner(tmp_path, caplog):
    """Same machine, the pid alive (our own) but started at another time than the lease's process: stale."""
    _foreign(tmp_path, renewed_ago=1, **this_machine(), pid=os.getpid(), start="1")
    with caplog.at_level(logging.WARNING, "metascale.cluster.lease"):
        Lease.acquire(str(tmp_path)).release()
    assert "no longer runs on this host" in caplog.text


def test_a_stale_foreign_lease_is_taken_over_after_its_ttl(tmp_path, caplog):
    _foreign(tmp_path / "old", renewed_ago=61, ttl_s=60)
    with caplog.at_level(logging.WARNING, "metascale.cluster.lease"):
        Lease.acquire(str(tmp_path / "old")).release()
    assert "took over the lease of run alice@elsewhere.example pid 4242 (not renewed for 61 s, ttl 60 s)" in caplog.text
    # A live one (ttl 1 s) is refused now, and taken over by a run that waits for it to expire.
    _foreign(tmp_path / "new", renewed_ago=0, ttl_s=1.0)
    with pytest.raises(CheckpointError, match="in use by run alice@elsewhere.example pid 4242"):
        Lease.acquire(str(tmp_path / "new"))
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, "metascale.cluster.lease"):
        Lease.acquire(str(tmp_path / "new"), wait_s=5).release()
    assert 0.5 < time.monotonic() - t0 < 4
    assert (
        "new is in use by run alice@elsewhere.example pid 4242 (renewed 0 s ago; taken over if not renewed for 1 s)"
        "; waiting up to 5 s for it to end or go stale" in caplog.text
    )


def test_a_live_foreign_lease_is_refused_even_if_its_pid_is_dead_here(tmp_path):
    pid = _dead_pid()
    _foreign(tmp_path / "a", renewed_ago=5, pid=pid)
    with pytest.raises(CheckpointError) as e:
        Lease.acquire(str(tmp_path / "a"))
    assert str(e.value) == (
        f"{tmp_path / 'a'} is in use by run alice@elsewhere.example pid {pid} (renewed 5 s ago; "
        "taken over if not renewed for 60 s); wait for it to end, or set checkpoint.dir (or the "
        "job name) for a new run"
    )
    assert e.value.exit_code == 2
    # Same hostname but another machine (boot id) or another pid namespace (a container): not the fast path either.
    for other in ({"boot": "another-boot-id"}, {"pidns": "pid:[1]"}):
        _foreign(tmp_path / "b", renewed_ago=5, **{**this_machine(), **other}, pid=pid)
        with pytest.raises(CheckpointError, match="is in use by run"):
            Lease.acquire(str(tmp_path / "b"))


def test_the_heartbeat_renews_the_lease(tmp_path):
    with Lease.acquire(str(tmp_path), ttl_s=1.0, heartbeat_s=0.1) as lease:
        first = _lease_json(tmp_path)
        time.sleep(0.6)
        later = _lease_json(tmp_path)
        assert later["token"] == first["token"] == lease.token
        assert later["renewed"] > first["renewed"] + 0.3
        assert later["acquired"] == first["acquired"]
        lease.check(reread=True)  # 0.6 s > ttl - heartbeat: passes only because it was renewed


def test_a_taken_over_lease_makes_check_raise(tmp_path):
    lease = Lease.acquire(str(tmp_path), ttl_s=1.0, heartbeat_s=0.1)
    _foreign(tmp_path, renewed_ago=0)  # another run took it over
    with pytest.raises(LeaseLost, match="lost its lease to run alice@elsewhere.example pid 4242"):
        lease.check(reread=True)  # at once, with a read
    lease2 = Lease.acquire(str(tmp_path / "b"), ttl_s=1.0, heartbeat_s=0.1)
    _foreign(tmp_path / "b", renewed_ago=0)
    deadline = time.monotonic() + 3
    while lease2.lost is None and time.monotonic() < deadline:
        lease2.check()  # passes until the heartbeat has seen the other run's token
        time.sleep(0.05)
    with pytest.raises(LeaseLost, match="lost its lease to run alice@elsewhere.example"):
        lease2.check()  # the heartbeat found out, without a read here
    for held in (lease, lease2):
        held.release()
    assert _lease_json(tmp_path)["owner"] == _lease_json(tmp_path / "b")["owner"] == "alice@elsewhere.example pid 4242"


def test_check_raises_when_the_store_stops_answering(tmp_path, monkeypatch):
    lease = Lease.acquire(str(tmp_path), ttl_s=0.6, heartbeat_s=0.1)

    def refuse(name, data):
        raise OSError("Stale file handle")

    monkeypatch.setattr(lease._store, "replace", refuse)
    time.sleep(0.8)
    with pytest.raises(LeaseLost, match="not been renewed for 1 s: OSError: Stale file handle"):
        lease.check()
    lease.release()


@pytest.mark.parametrize("store", ["local", "memory"])
def test_a_take_over_never_replaces_a_lease_that_changed_since_it_was_judged_stale(tmp_path, monkeypatch, store):
    """Two would-be owners judge one stale lease: the first takes it over; the second, which read the stale lease
    before that, must not remove the first one's new lease. Likewise a holder that renews in between keeps it."""
    directory = str(tmp_path) if store == "local" else f"memory://lease-{secrets.token_hex(4)}/ck"
    judged = Lease._stale

    for meanwhile in ("another run took it over", "its holder renewed it"):
        _foreign(directory, renewed_ago=120)

        def stale_then_changed(seen, machine, ttl_s):
            reason = judged(seen, machine, ttl_s)
            monkeypatch.setattr(Lease, "_stale", staticmethod(judged))  # once
            if meanwhile == "another run took it over":
                _foreign(directory, renewed_ago=0, host="winner.example")
            else:
                info = json.loads(seen.raw)
                fs, root = fsspec.core.url_to_fs(directory)
                fs.pipe_file(f"{root}/.lease", json.dumps({**info, "renewed": time.time()}).encode())
            return reason

        monkeypatch.setattr(Lease, "_stale", staticmethod(stale_then_changed))
        before = _lease_json(directory) if meanwhile == "its holder renewed it" else None
        with pytest.raises(CheckpointError, match="is in use by run alice@"):
            Lease.acquire(directory)
        after = _lease_json(directory)
        if before is None:
            assert after["host"] == "winner.example"
        else:
            assert after["token"] == before["token"] and after["renewed"] > before["renewed"]
        fs, root = fsspec.core.url_to_fs(directory)
        assert [p for p in fs.ls(root, detail=False) if ".lease" in p] == [f"{root}/.lease"]  # nothing left aside


def test_a_take_over_waits_for_another_runs_take_over_lock_unless_that_run_died(tmp_path, monkeypatch, caplog):
    from metascale.cluster import lease as module

    monkeypatch.setattr(module, "TAKEOVER_LOCK_S", 0.5)
    # Another machine's run is taking the stale lease over right now: wait for it (bounded), then refuse naming it.
    _foreign(tmp_path / "a", renewed_ago=120)
    _foreign(tmp_path / "a", renewed_ago=0, name=".lease.takeover", user="bob", host="taker.example", pid=7)
    t0 = time.monotonic()
    with pytest.raises(
        CheckpointError,
        match=r"run bob@taker.example pid 7 has been taking over its stale lease "
        r"\(of run alice@elsewhere.example pid 4242\)",
    ):
        Lease.acquire(str(tmp_path / "a"))
    assert 0.4 < time.monotonic() - t0 < 3
    # The lock of a run that died while taking over, on this machine (at once) or elsewhere (once older than its
    # ttl_s, which runs write as TAKEOVER_LOCK_S): cleared, and the stale lease taken over.
    for name, died in (("b", {**this_machine(), "pid": _dead_pid()}), ("c", {"renewed_ago": 1, "ttl_s": 0.5})):
        _foreign(tmp_path / name, renewed_ago=120)
        _foreign(tmp_path / name, **{"renewed_ago": 0, **died}, name=".lease.takeover", user="bob")
        with caplog.at_level(logging.WARNING, "metascale.cluster.lease"):
            lease = Lease.acquire(str(tmp_path / name))
        assert "took over the lease of run alice@elsewhere.example pid 4242" in caplog.text
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == [".lease"]
        lease.release()


@pytest.mark.parametrize("before", ["none", "stale foreign", "killed here"])
def test_racing_processes_exactly_one_wins(tmp_path, before):
    for round_ in range(2):
        directory = tmp_path / f"round{round_}"
        if before == "stale foreign":
            _foreign(directory, renewed_ago=120)
        elif before == "killed here":
            _foreign(directory, renewed_ago=1, **this_machine(), pid=_dead_pid())
        children = [_spawn(directory, go=True) for _ in range(4)]
        for child in [_ready(c) for c in children]:  # all imported and waiting first, then started together
            child.stdin.write(b"go\n")
        firsts = [_line(c) for c in children]
        winners = [c for c, line in zip(children, firsts) if line == "won"]
        assert len(winners) == 1, firsts
        results = [_finish(c) for c in children]
        assert sorted(code for code, _, _ in results) == [0, 2, 2, 2]
        assert all("is in use by run" in line for line in firsts if line != "won"), firsts


def test_the_lease_on_fsspec_memory(caplog):
    url = f"memory://lease-{secrets.token_hex(4)}/ck"
    with Lease.acquire(url, ttl_s=1.0, heartbeat_s=0.1) as lease:
        assert checkpoint.list_steps(url) == []  # the lease file is not a checkpoint
        with pytest.raises(CheckpointError, match=f"{url} is in use by run {lease.owner}"):
            Lease.acquire(url)
        renewed = _lease_json(url)["renewed"]
        time.sleep(0.35)
        assert _lease_json(url)["renewed"] > renewed
        lease.check(reread=True)
    assert not fsspec.filesystem("memory").exists(url[len("memory://") :] + "/.lease")
    _foreign(url, renewed_ago=61)
    with caplog.at_level(logging.WARNING, "metascale.cluster.lease"):
        lease = Lease.acquire(url, ttl_s=1.0, heartbeat_s=0.1)
    assert "took over the lease of run alice@elsewhere.example pid 4242" in caplog.text
    _foreign(url, renewed_ago=0)
    with pytest.raises(LeaseLost):
        lease.check(reread=True)
    lease.release()
    assert _lease_json(url)["owner"] == "alice@elsewhere.example pid 4242"  # not ours to remove


def test_a_file_url_and_its_path_are_one_lease(tmp_path):
    with Lease.acquire(f"file://{tmp_path}/ck"):
        with pytest.raises(CheckpointError, match="is in use by run"):
            Lease.acquire(str(tmp_path / "ck"))


def test_a_read_only_store_is_refused_in_one_line(tmp_path, http_server):
    with pytest.raises(CheckpointError, match="cannot take its lease file .lease .*writable") as e:
        Lease.acquire(f"{http_server(tmp_path)}/ck")
    assert "\n" not in str(e.value)


def test_the_heartbeat_must_fit_twice_in_the_ttl(tmp_path):
    with pytest.raises(ValueError, match="at most ttl_s/2"):
        Lease.acquire(str(tmp_path), ttl_s=10, heartbeat_s=6)
