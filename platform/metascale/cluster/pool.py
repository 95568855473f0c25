"""The worker pool: `cluster.workers` workers behind one call, `run(items, params)`, whatever kind they are.

A worker is a replica (one process, cluster/replica.py) or, with `sharding.engine: deepspeed`, a rank group
(`sharding.ranks` processes running one DeepSpeed engine, sharding/group.py); both take WorkItems and give back
WorkResults, and `cluster.address: inline` runs one replica inside the driver, for pdb. Item i goes to worker
i mod N and the results come back in item order, so the coordinator's sum never depends on which worker finished
first.

Faults cost time, never results. A worker is lost when its process dies (a killed actor, a removed node), when a
rank's collective breaks because a peer left, or when a call outlives its limit (`cluster.timeout`: `factor` x the
slowest call of its kind so far, per slot, never under `min_s`, plus `startup_s` while the worker starts). A lost
worker is ended and started again (a replica by Ray, in its placement bundle; a rank group rebuilt whole, on
whatever node has room), and its item is sent again, to the next worker, as a unit: the same slots in the same
order, so the recomputed result is bit-identical to the lost one. Until a restarted worker is up, the running
workers take its items, so a worker that cannot be placed again (a node gone for good) costs throughput, not a
stall; which worker computes an item never changes the result.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

from metascale.cluster import faults
from metascale.cluster.messages import WorkerBroken, WorkItem, WorkResult
from metascale.cluster.replica import ALLOCATOR_ENV, Replica
from metascale.config import JobSpec
from metascale.errors import ClusterError, MetascaleError
from metascale.extras import check

log = logging.getLogger(__name__)


class Worker(Protocol):
    """The driver's handle on one worker of either kind."""

    index: int
    ready: list[Any]  # object refs that resolve once its processes are up (new ones after each restart)
    generation: int  # how many times it was started: a loss seen by an older call must not restart a newer one

    def submit(self, item: WorkItem, params: Any) -> list[Any]: ...  # the item's object refs, one per process

    def combine(self, parts: list[WorkResult]) -> WorkResult: ...  # one result from the processes' parts

    def restart(self, hung: bool) -> None: ...  # a fresh worker in its place (hung: the old one must be ended)

    def stop(self) -> None: ...


class InlinePool:
    """One replica inside the driver: no Ray, for debugging with pdb (`cluster.address: inline`)."""

    def __init__(self, spec: JobSpec):
        self.size = 1
        self.replica = Replica(spec, 0)
        self.failures = 0

    def run(self, items: Sequence[WorkItem], params: Any) -> list[WorkResult]:
        return [self.replica.run(item, params) for item in items]

    def put(self, value: Any) -> Any:
        return value

    def get(self, ref: Any) -> Any:
        return ref

    def shutdown(self) -> None:
        pass


class RemoteReplica:
    """A replica as a Ray actor in bundle `index` of the pool's placement group; Ray restarts it after a loss."""

    def __init__(self, spec: JobSpec, index: int, pg: Any, env: dict[str, str]):
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        c = spec.cluster
        self.ray, self.index, self.generation = ray, index, 1
        self.actor = (
            ray.remote(Replica)
            .options(
                num_cpus=c.cpus_per_process,
                num_gpus=c.gpus_per_process,
                max_restarts=-1,
                max_task_retries=0,  # re-dispatch is the pool's: it may go to another worker
                runtime_env={"env_vars": env},
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=index),
                name=f"{actor_prefix(spec)}-worker-{index}",  # findable by operators (and fault tests)
            )
            .remote(spec.model_dump(mode="json"), index)
        )
        self.ready = [self.actor.ping.remote()]

    def submit(self, item: WorkItem, params: Any) -> list[Any]:
        return [self.actor.run.remote(item, params)]

    def combine(self, parts: list[WorkResult]) -> WorkResult:
        return parts[0]

    def restart(self, hung: bool) -> None:
        if hung:  # a dead replica is already being restarted by Ray; a hung one must be ended first
            self.ray.kill(self.actor, no_restart=False)
        self.ready = [self.actor.ping.remote()]  # answered once the restarted process is up
        self.generation += 1

    def stop(self) -> None:
        self.ray.kill(self.actor, no_restart=True)


@dataclass
class _Flight:
    index: int  # the item's place in run's list
    item: WorkItem
    worker: Worker
    generation: int  # the worker's, when the item was sent
    refs: list[Any]
    limit: float
    deadline: float


class RayPool:
    """`cluster.workers` workers on Ray: replicas in one placement group, or rank groups with one each."""

    MAX_ATTEMPTS = 5

    def __init__(self, spec: JobSpec):
        import ray

        self.ray, self.spec = ray, spec
        c = spec.cluster
        env = {**ALLOCATOR_ENV, "OMP_NUM_THREADS": str(spec.executor.threads), **faults.forwarded()}
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            options: dict[str, Any] = {"logging_level": logging.WARNING, "runtime_env": {"env_vars": env}}
            if c.address == "local":
                need = int(c.workers * spec.sharding.ranks * c.cpus_per_process) + 1
                options.update(num_cpus=max(os.cpu_count() or 1, need), include_dashboard=False)
            ray.init(address=c.address, **options)
        self.size, self.failures = c.workers, 0
        self.slowest: dict[str, float] = {}  # seconds per slot of the slowest call of each kind so far
        self.pg = None
        self.workers: list[Any] = []
        try:
            if spec.sharding.engine == "deepspeed":
                from metascale.sharding.group import RankGroup

                self.workers = [RankGroup(spec, i, env) for i in range(c.workers)]
            else:
                self.pg = self._placement(spec)
                self.workers = [RemoteReplica(spec, i, self.pg, env) for i in range(c.workers)]
            self._await_start()
        except BaseException:
            self.shutdown()
            raise

    def _placement(self, spec: JobSpec) -> Any:
        from ray.util.placement_group import placement_group

        c, limit = spec.cluster, spec.cluster.timeout.startup_s
        bundle = {"CPU": c.cpus_per_process, **({"GPU": c.gpus_per_process} if c.gpus_per_process else {})}
        pg = placement_group([bundle] * c.workers, strategy="PACK", name=actor_prefix(spec))
        ready, _ = self.ray.wait([pg.ready()], timeout=limit)
        if not ready:
            raise ClusterError(
                f"the cluster cannot place {c.workers} workers of {bundle} within {limit:.0f} s "
                f"(available: {self.ray.available_resources()}); lower cluster.workers or the per-process resources"
            )
        return pg

    def _await_start(self) -> None:
        """Every worker answered (replicas: a ping; rank groups: placed, joined, engines built), within startup_s."""
        limit = self.spec.cluster.timeout.startup_s
        refs = [r for w in self.workers for r in w.ready]
        ready, _ = self.ray.wait(refs, num_returns=len(refs), timeout=limit)
        if len(ready) < len(refs):
            raise ClusterError(
                f"{len(refs) - len(ready)} of {len(refs)} worker processes did not start within {limit:.0f} s "
                f"(available: {self.ray.available_resources()}); lower cluster.workers or sharding.ranks, or raise "
                "cluster.timeout.startup_s"
            )
        try:
            self.ray.get(refs)
        except self.ray.exceptions.RayTaskError as e:
            raise _user_error(e) from None

    def put(self, value: Any) -> Any:
        """One object-store copy shared by every worker (one put, many gets)."""
        return self.ray.put(value)

    def get(self, ref: Any) -> Any:
        return self.ray.get(ref)

    # ---------------------------------------------------------------------------------------- dispatch
    def run(self, items: Sequence[WorkItem], params: Any) -> list[WorkResult]:
        results: list[WorkResult | None] = [None] * len(items)
        attempts = [0] * len(items)
        flights: list[_Flight] = []
        up = [w for w in self.workers if self._up(w)]
        for i, item in enumerate(items):
            worker = self.workers[i % self.size]
            if up and worker not in up:  # still being rebuilt (or no room for it): a running worker takes its share
                worker = up[i % len(up)]
            flights.append(self._send(i, item, worker, params, flights))
        while flights:
            wait_s = max(0.0, min(f.deadline for f in flights) - time.monotonic())
            self.ray.wait([r for f in flights for r in f.refs], num_returns=1, timeout=wait_s)
            for f in list(flights):
                outcome = self._outcome(f)
                if outcome is None:
                    continue
                flights.remove(f)
                if isinstance(outcome, WorkResult):
                    results[f.index] = outcome
                    continue
                attempts[f.index] += 1
                self.failures += 1
                if attempts[f.index] >= self.MAX_ATTEMPTS:
                    raise ClusterError(f"{_describe(f.item)} failed {attempts[f.index]} times; last: {outcome}")
                if f.generation == f.worker.generation:  # not restarted yet since this item was sent
                    f.worker.restart(hung=outcome.startswith("no answer"))
                turn = [self.workers[(f.worker.index + attempts[f.index] + k) % self.size] for k in range(self.size)]
                retry = next((w for w in turn if self._up(w)), turn[0])  # the next worker that is up, if any
                log.warning(
                    "worker %d was lost during %s (%s); recomputing it on worker %d",
                    f.worker.index,
                    _describe(f.item),
                    outcome,
                    retry.index,
                )
                flights.append(self._send(f.index, f.item, retry, params, flights))
        return results  # type: ignore[return-value]

    def limit(self, item: WorkItem, worker: Worker, queued: int = 0) -> float:
        """Seconds `item` may take on `worker` before the worker counts as lost (`cluster.timeout`), with `queued`
        calls ahead of it there (a worker runs its calls one at a time)."""
        t = self.spec.cluster.timeout
        per_slot = self.slowest.get(item.kind)
        own = max(t.min_s, t.factor * per_slot * len(item.slots)) if per_slot is not None else max(t.min_s, t.startup_s)
        return own * (1 + queued) + (0.0 if self._up(worker) else t.startup_s)

    def _up(self, worker: Worker) -> bool:
        """Whether the worker's processes have started (its ready refs resolved)."""
        done, _ = self.ray.wait(worker.ready, num_returns=len(worker.ready), timeout=0)
        return len(done) == len(worker.ready)

    def _send(self, i: int, item: WorkItem, worker: Worker, params: Any, flights: list[_Flight]) -> _Flight:
        limit = self.limit(item, worker, queued=sum(f.worker is worker for f in flights))
        return _Flight(i, item, worker, worker.generation, worker.submit(item, params), limit, time.monotonic() + limit)

    def _outcome(self, f: _Flight) -> WorkResult | str | None:
        """The item's result, or why its worker is lost, or None while it is still running."""
        ray = self.ray
        done, _ = ray.wait(f.refs, num_returns=len(f.refs), timeout=0)
        for ref in done:
            try:
                ray.get(ref)
            except _lost_errors() as e:
                return f"process lost: {str(e).split('. ')[0].strip()[:200]}"
            except ray.exceptions.RayTaskError as e:
                cause = e.cause if isinstance(e.cause, BaseException) else e
                if isinstance(cause, MetascaleError):
                    raise cause from None  # the user's to fix (bad data, a non-finite stop): one line, no retry
                if isinstance(cause, WorkerBroken) or len(f.refs) > 1:
                    return f"a rank failed: {_first_line(cause)}"  # a rank group: a peer broke its collectives
                log.debug("worker %d failed:\n%s", f.worker.index, e)
                raise ClusterError(f"worker {f.worker.index} failed: {_first_line(cause)}") from None
        if len(done) == len(f.refs):
            result = f.worker.combine(ray.get(f.refs))
            per_slot = (result.data_s + result.compute_s) / len(f.item.slots)
            self.slowest[f.item.kind] = max(self.slowest.get(f.item.kind, 0.0), per_slot)
            return result
        if time.monotonic() > f.deadline:
            return f"no answer within {f.limit:.0f} s"
        return None

    def shutdown(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for w in self.workers:
            w.stop()
        if self.pg is not None:
            remove_placement_group(self.pg)
        if self._owns_ray:
            self.ray.shutdown()


def actor_prefix(spec: JobSpec) -> str:
    """Names of this run's actors and placement groups: the job and the driver's pid, so runs never collide."""
    return f"metascale-{spec.name}-{os.getpid()}"


def _lost_errors() -> tuple[type[BaseException], ...]:
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, WorkerCrashedError

    return (RayActorError, ActorDiedError, ActorUnavailableError, WorkerCrashedError)


def _user_error(e: Any) -> BaseException:
    """A worker's start-up error as the user should see it: our own message, or its last line."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, MetascaleError) else ClusterError(f"a worker failed to start: {_first_line(e)}")


def _first_line(e: BaseException) -> str:
    """The line that says what went wrong: the last of a remote traceback (its exception), at most 300 characters."""
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return (lines[-1] if lines else type(e).__name__)[:300]


def _describe(item: WorkItem) -> str:
    slots = f"{item.slots[0]}-{item.slots[-1]}" if len(item.slots) > 1 else str(item.slots[0])
    return f"{item.kind} of step {item.step} (slots {slots})"


def build_pool(spec: JobSpec) -> InlinePool | RayPool:
    if spec.sharding.engine == "deepspeed":
        check("deepspeed")  # before Ray starts: a missing extra is one line, not a traceback from every rank
    return InlinePool(spec) if spec.cluster.address == "inline" else RayPool(spec)


def split_slots(n: int, groups: int) -> list[list[int]]:
    """Contiguous, deterministic slot groups: sizes differ by at most one, none empty."""
    groups = min(groups, n)
    base, extra = divmod(n, groups)
    out, start = [], 0
    for g in range(groups):
        size = base + (g < extra)
        out.append(list(range(start, start + size)))
        start += size
    return out
