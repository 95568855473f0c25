"""A run owns its checkpoint directory through an exclusive lease, so that two runs of one job never write into the
same directory (issue #17: two `metascale run` started seconds apart both passed the "already holds checkpoints"
check and the second one's parameters ended up under the first one's checkpoints).

The lease is the file `<dir>/.lease`, one JSON object: who holds it (`owner`, a `user@host pid N` description, plus
the host, boot id, pid namespace, pid and process start time used to tell whether that process still runs), a random
`token`, and `acquired` / `renewed` wall-clock times with the holder's `ttl_s` and `heartbeat_s`.

- Acquire: an exclusive create. On local disk (a path or `file://`), `os.open(O_CREAT | O_EXCL)`: atomic, also on
  NFSv3+. On other stores (cluster/storage.py), `fs.pipe_file(path, data, mode="create")`, fsspec's conditional
  create: `s3://` (metascale's obstore-backed filesystem), s3fs, gcsfs and adlfs send it as a conditional PUT
  (If-None-Match: * / ifGenerationMatch=0 / overwrite=False), atomic on the server; `memory://` checks and stores in
  one call. Stores that do not implement it fall back to fsspec's default,
  "exists? then write", which is NOT atomic: two runs within one round trip of each other can both write, the later
  write wins. Against that, every create is read back after `UNSURE_SETTLE_S` and the token compared (the earlier
  writer then sees the later one's token and backs off), and the heartbeat compares the token every `heartbeat_s`;
  what is left is a window of about one round trip, on stores nobody here uses for checkpoints (http(s) is read-only
  for us; gcsfs/adlfs are not installed by default and have conditional writes when they are; fsspec's
  ArrowFSWrapper over pyarrow's S3 has none, and is treated as such).
- A live lease (renewed within its holder's `ttl_s`) refuses a second acquire with a one-line CheckpointError naming
  the holder; `wait_s` lets a caller wait (bounded) for it to be released or to go stale.
- Stale: not renewed for more than the holder's `ttl_s` (its run died without releasing: SIGKILL, node loss), or held
  by a process that no longer runs on this very machine (same hostname, boot id and pid namespace, and the pid is
  gone, a zombie, or a different process since its start time differs): the fast path after a SIGKILL on one machine.
  A stale lease is taken over with a warning naming the old holder.
- Take-over: the would-be owner first creates the take-over lock `<dir>/.lease.takeover` exclusively (as above), so
  of two would-be owners only one proceeds; the other waits for it (a few store round trips) and then finds a live
  lease. Holding the lock, it re-reads the lease and goes on only if it still holds exactly the bytes judged stale
  (not renewed, released or taken over since), then replaces it with its own atomically (temp + rename; the name never
  disappears, so a run arriving meanwhile finds a lease and cannot slip in with a plain create), reads it back and
  removes the lock. A lock left by a run that died while taking over is stale after `TAKEOVER_LOCK_S` (at once if
  that run was on this machine). Residual race: a holder that is in fact alive but has not renewed for `ttl_s`
  (stopped, or its storage hung) and renews between the taker's re-read and its replace is overwritten; its next
  heartbeat sees the taker's token and it stops.
- Heartbeat: a daemon thread re-reads the lease every `heartbeat_s`; if the token is still ours it rewrites it with a
  new `renewed` atomically (temp + fsync + rename locally, temp + move elsewhere); if not (another run took it over,
  or the file is gone), it records that and stops, and `check()` raises LeaseLost. `check()` also raises when the
  lease has not been renewed for `ttl_s - heartbeat_s` (storage unreachable), before anyone else may take it over.
  Residual race: a holder that stalled for longer than `ttl_s` (SIGSTOP, a hung mount) can, in the instant between
  its heartbeat's read and its rewrite, overwrite the lease of a run that has just taken over; the taker's next
  heartbeat then sees the foreign token and stops, so one run still remains.
- Release: stops the heartbeat and removes the file only if the token is still ours (read, compare, delete: a
  take-over landing between the read and the delete would need this run to be stale at that very moment).

Defaults: a heartbeat every 10 s and a ttl of 60 s. 60 s is long enough that a stalled garbage collection, a slow
or briefly unreachable filesystem, or a loaded machine does not make a live run look dead (it misses five
heartbeats first), and short enough that a job resumed after a crash on another machine waits at most a minute; on
the same machine the dead-pid fast path takes a SIGKILLed run's lease over at once. Staleness is judged with the
reader's wall clock against the writer's: hosts must keep their clocks in sync (NTP), a skew of more than
`ttl_s - heartbeat_s` would make a live lease look stale.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
import time
from typing import Any

from metascale.cluster.lease_store import (
    LOCK,
    NAME,
    LeaseStore,
    Seen,
    proc_stat,
    still_running,
    this_machine,
    user_name,
)
from metascale.errors import CheckpointError

log = logging.getLogger(__name__)

TAKEOVER_LOCK_S = 10.0  # a take-over holds LOCK for a few store round trips; a lock older than this is a dead run's
TTL_S = 60.0
HEARTBEAT_S = 10.0
UNSURE_SETTLE_S = 1.0
_ATTEMPTS = 20  # create / inspect / take-over rounds in one acquire before giving up (each makes progress or waits)


class LeaseLost(CheckpointError):
    """This run no longer owns its checkpoint directory: stop without writing to it."""


def _ago(seconds: float) -> str:
    return f"{max(seconds, 0):.0f} s"


class Lease:
    """An exclusive, heartbeat-renewed lease on a checkpoint directory. Take it with `Lease.acquire` before anything
    else in a run; call `check()` every step (and `check(reread=True)` right before writing a checkpoint); release it
    at the end (or use it as a context manager)."""

    def __init__(self, store: LeaseStore, directory: str, owner: str, ttl_s: float, heartbeat_s: float):
        self.directory = directory
        self.path = store.at(NAME)
        self.owner = owner
        self.ttl_s = ttl_s
        self.heartbeat_s = heartbeat_s
        self.token = secrets.token_hex(16)
        self.acquired = time.time()
        self._store = store
        self._io = threading.Lock()  # one renewal or release at a time
        self._stop = threading.Event()
        self._lost: str | None = None
        self._renewed_mono = time.monotonic()
        self._last_error: str | None = None
        self._thread: threading.Thread | None = None

    # -- acquiring ---------------------------------------------------------------------------------------------

    @classmethod
    def acquire(
        cls,
        directory: str,
        owner: str | None = None,
        ttl_s: float = TTL_S,
        heartbeat_s: float = HEARTBEAT_S,
        wait_s: float = 0.0,
    ) -> Lease:
        """Takes the lease on `directory` (created if missing) or raises CheckpointError naming the run that holds
        it. A stale lease is taken over with a warning. `wait_s` > 0 waits up to that long for a live lease to be
        released or to go stale (poll every second at most), e.g. `ttl_s` when resuming a run that just crashed
        on another machine."""
        if not 0 < heartbeat_s <= ttl_s / 2:
            raise ValueError(f"lease heartbeat_s={heartbeat_s} must be positive and at most ttl_s/2 (ttl_s={ttl_s})")
        store = LeaseStore(directory)
        machine = this_machine()
        owner = owner or f"{user_name()}@{machine['host']} pid {os.getpid()}"
        lease = cls(store, directory, owner, ttl_s, heartbeat_s)
        try:
            store.makedirs()
        except Exception as e:  # noqa: BLE001 - any store error means the same to the user
            raise CheckpointError(f"{directory}: cannot create the checkpoint directory ({e})") from None
        deadline = time.monotonic() + wait_s
        try:
            return lease._take(store, machine, deadline)
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - a store error: one line for the user, not a trace
            raise CheckpointError(
                f"{directory}: cannot take its lease file {NAME} ({type(e).__name__}: {e}); "
                "checkpoint.dir must be a writable local path or fsspec store"
            ) from None

    def _take(self, store: LeaseStore, machine: dict[str, Any], deadline: float) -> Lease:
        races = 0  # rounds that found the lease changing under us (each one means another run made progress)
        told = False
        while races < _ATTEMPTS:
            if store.create(NAME, self._payload(machine)):
                if self._confirmed(store):
                    self._start()
                    return self
                races += 1
                continue  # a racing plain write replaced ours (non-conditional store): look again
            seen = store.read()
            if seen is None:
                races += 1
                continue  # released in between: try again
            stale = self._stale(seen, machine, self.ttl_s)
            if stale is None:
                if time.monotonic() >= deadline:
                    raise CheckpointError(self._refusal(self.directory, seen, self.ttl_s))
                if not told:
                    told = True
                    log.warning(
                        "%s; waiting up to %s for it to end or go stale",
                        self._refusal(self.directory, seen, self.ttl_s, how=""),
                        _ago(deadline - time.monotonic()),
                    )
                time.sleep(min(1.0, self.heartbeat_s, max(deadline - time.monotonic(), 0.0)))
                continue
            outcome = self._take_over(store, machine, seen)
            if outcome is True:
                log.warning("%s: took over the lease of run %s (%s)", self.directory, self._describe(seen), stale)
                self._start()
                return self
            if outcome is False:
                races += 1
                continue
            # another run holds the take-over lock: it finishes within a few store round trips
            if time.monotonic() >= deadline + TAKEOVER_LOCK_S:
                raise CheckpointError(
                    f"{self.directory}: run {outcome} has been taking over its stale lease (of run "
                    f"{self._describe(seen)}) for {_ago(TAKEOVER_LOCK_S)}; try again"
                )
            time.sleep(0.05)
        raise CheckpointError(
            f"{self.directory}: could not take its lease in {_ATTEMPTS} attempts (other runs keep "
            "taking and releasing it); try again"
        )

    def _take_over(self, store: LeaseStore, machine: dict[str, Any], stale: Seen) -> bool | str:
        """Replaces the stale lease `stale` with ours, under the take-over lock so that of two would-be owners only
        one replaces it, and only if the lease still holds exactly the bytes judged stale (neither renewed nor taken
        over since). The lease file is replaced atomically, never removed, so a run arriving meanwhile finds a lease
        and never slips in with a plain create. True: ours. False: look again. A str: the run that holds the lock."""
        lock = json.loads(self._payload(machine))
        lock["ttl_s"] = TAKEOVER_LOCK_S
        lock_raw = json.dumps(lock).encode()
        if not store.create(LOCK, lock_raw):
            held = store.read(LOCK)
            if held is None:
                return False  # just released
            if self._stale(held, machine, TAKEOVER_LOCK_S) is not None:  # its run died while taking over
                store.remove_if(LOCK, raw=held.raw)
                return False
            return self._describe(held)
        try:
            now = store.read()
            if now is None or now.raw != stale.raw:
                return False  # released, renewed or taken over since we judged it: look again
            store.replace(NAME, self._payload(machine))
            return self._confirmed(store)
        finally:
            store.remove_if(LOCK, raw=lock_raw)

    def _confirmed(self, store: LeaseStore) -> bool:
        """Reads the lease back: is it ours? On stores without a real conditional create, after letting a racing
        plain write land first."""
        if not store.conditional:
            time.sleep(UNSURE_SETTLE_S)
        seen = store.read()
        return seen is not None and seen.info is not None and seen.info["token"] == self.token

    def _payload(self, machine: dict[str, Any]) -> bytes:
        pid = os.getpid()
        stat = proc_stat(pid)
        return json.dumps(
            {
                "owner": self.owner,
                "token": self.token,
                **machine,
                "pid": pid,
                "start": stat[1] if stat else None,
                "acquired": self.acquired,
                "renewed": time.time(),
                "ttl_s": self.ttl_s,
                "heartbeat_s": self.heartbeat_s,
            }
        ).encode()

    @staticmethod
    def _describe(seen: Seen) -> str:
        return str(seen.info.get("owner", "?")) if seen.info else f"unknown (unreadable {NAME} file)"

    @staticmethod
    def _stale(seen: Seen, machine: dict[str, Any], ttl_s: float) -> str | None:
        """Why the lease seen is stale, or None if it is live."""
        now = time.time()
        info = seen.info
        if info is None:  # unreadable: judge by the file's age where the store tells it
            if seen.mtime is not None and now - seen.mtime > ttl_s:
                return f"unreadable and last written {_ago(now - seen.mtime)} ago"
            return None
        same_machine = all(info.get(k) == v for k, v in machine.items())
        if same_machine and isinstance(info.get("pid"), int) and not still_running(info["pid"], info.get("start")):
            return f"process {info['pid']} no longer runs on this host"
        ttl = float(info.get("ttl_s", ttl_s))
        age = now - float(info.get("renewed", 0))
        if age > ttl:
            return f"not renewed for {_ago(age)}, ttl {_ago(ttl)}"
        return None

    @staticmethod
    def _refusal(
        directory: str,
        seen: Seen,
        ttl_s: float,
        how: str = "; wait for it to end, or set checkpoint.dir (or the job name) for a new run",
    ) -> str:
        if seen.info is None:
            return (
                f"{directory} holds an unreadable lease file {NAME} (being written by a run that is starting, or "
                f"left by one that died; taken over once {_ago(ttl_s)} old where the store tells its age){how}"
                + (f", or delete {NAME} if no run uses the directory" if how else "")
            )
        info = seen.info
        age = time.time() - float(info.get("renewed", 0))
        ttl = float(info.get("ttl_s", ttl_s))
        return (
            f"{directory} is in use by run {info.get('owner', '?')} (renewed {_ago(age)} ago; taken over if not "
            f"renewed for {_ago(ttl)}){how}"
        )

    # -- holding -----------------------------------------------------------------------------------------------

    def _start(self) -> None:
        self._renewed_mono = time.monotonic()
        self._thread = threading.Thread(target=self._beat, name=f"lease-heartbeat {self.path}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if not self.renew():
                return

    def renew(self) -> bool:
        """One heartbeat: re-reads the lease and, if it is still ours, rewrites it with a new `renewed` time. Returns
        False once the lease is lost (then `check()` raises). A storage error is logged and retried next beat."""
        with self._io:
            if self._stop.is_set() or self._lost:
                return not self._lost
            try:
                seen = self._store.read()
                if not self._ours(seen):
                    log.error("%s", self._lost)
                    return False
                started = time.monotonic()
                info = dict(seen.info, renewed=time.time())
                self._store.replace(NAME, json.dumps(info).encode())
                self._renewed_mono = started
                self._last_error = None
                return True
            except Exception as e:  # noqa: BLE001 - a flaky store: try again next beat; check() bounds how long
                self._last_error = f"{type(e).__name__}: {e}"
                log.warning(
                    "%s: could not renew the lease (%s); retrying in %.0f s",
                    self.directory,
                    self._last_error,
                    self.heartbeat_s,
                )
                return True

    def check(self, reread: bool = False) -> None:
        """Raises LeaseLost if this run no longer owns the directory: the heartbeat found another run's token (or
        no lease), the lease has gone unrenewed for `ttl_s - heartbeat_s` (about to be taken over), or it was
        released. Cheap by default (no I/O: call it every step); `reread=True` also reads the lease file now (one
        small read: call it right before writing a checkpoint)."""
        if self._lost:
            raise LeaseLost(self._lost)
        if self._stop.is_set():
            raise LeaseLost(f"{self.directory}: the lease was released")
        unrenewed = time.monotonic() - self._renewed_mono
        if unrenewed > self.ttl_s - self.heartbeat_s:
            why = f": {self._last_error}" if self._last_error else ""
            raise LeaseLost(
                f"{self.directory}: the lease has not been renewed for {_ago(unrenewed)}{why}; stopping "
                f"before another run may take it over (ttl {_ago(self.ttl_s)})"
            )
        if reread and not self._ours(self._store.read()):
            raise LeaseLost(self._lost)

    def _ours(self, seen: Seen | None) -> bool:
        """Whether the lease read is still ours; if not, records (in `lost`) to whom it went."""
        if seen is not None and seen.info is not None and seen.info["token"] == self.token:
            return True
        holder = "nobody (the lease file is gone)" if seen is None else f"run {self._describe(seen)}"
        self._lost = (
            f"{self.directory}: this run ({self.owner}) lost its lease to {holder}; stopping without "
            "writing to that directory"
        )
        return False

    @property
    def lost(self) -> str | None:
        """Why the lease was lost, or None while it is held."""
        return self._lost

    def release(self) -> None:
        """Stops the heartbeat and removes the lease file if it still holds our token. Idempotent; bounded: if the
        store does not answer within a heartbeat, the file is left to expire after `ttl_s`."""
        if self._stop.is_set():
            return
        self._stop.set()
        if not self._io.acquire(timeout=self.heartbeat_s):
            log.warning(
                "%s: the lease's storage did not answer; it expires %s after its last renewal",
                self.directory,
                _ago(self.ttl_s),
            )
            return
        try:
            if not self._lost and not self._store.remove_if(NAME, token=self.token):
                log.warning("%s: not releasing the lease: another run holds it now", self.directory)
        except Exception as e:  # noqa: BLE001 - releasing is best effort: the lease expires anyway
            log.warning(
                "%s: could not remove the lease (%s); it expires %s after its last renewal",
                self.directory,
                e,
                _ago(self.ttl_s),
            )
        finally:
            self._io.release()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.heartbeat_s)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "lost" if self._lost else "released" if self._stop.is_set() else "held"
        return f"Lease({self.directory!r}, owner={self.owner!r}, {state})"
