"""The worker pool: Ray actors in a placement group, or one in-driver worker, behind one `map` call.

`map(method, groups, ...)` runs one call per slot group and returns the results in group order. A call that fails
because its worker died (`ray.kill`, a lost node) is sent again, to another live worker when there is one (the dead
actor is also restarted by Ray), so a meta-step costs time, never results. Because a group is always recomputed as a
unit, with the same slots in the same order, a recomputed result is bit-identical to the lost one.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Sequence

from metascale.cluster.worker import ALLOCATOR_ENV, MetaWorker
from metascale.config import JobSpec
from metascale.errors import ClusterError

log = logging.getLogger(__name__)


class InlinePool:
    """One worker inside the driver: no Ray, for debugging with pdb (`cluster.address: inline`)."""

    def __init__(self, spec: JobSpec):
        self.size = 1
        self.worker = MetaWorker(spec, 0)
        self.failures = 0

    def map(self, method: str, groups: Sequence[Sequence[int]], *args: Any) -> list[Any]:
        return [getattr(self.worker, method)(args[0], list(g), *args[1:]) for g in groups]

    def put(self, value: Any) -> Any:
        return value

    def shutdown(self) -> None:
        pass


class RayPool:
    """`cluster.workers` Ray actors, one placement-group bundle each (a GPU each when gpus_per_worker > 0)."""

    MAX_ATTEMPTS = 5

    def __init__(self, spec: JobSpec):
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.ray = ray
        c = spec.cluster
        env = {**ALLOCATOR_ENV, "OMP_NUM_THREADS": str(spec.executor.threads)}
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            if c.address == "local":
                need = int(c.workers * c.cpus_per_worker) + 1
                ray.init(
                    address="local",
                    num_cpus=max(os.cpu_count() or 1, need),
                    include_dashboard=False,
                    logging_level=logging.WARNING,
                    runtime_env={"env_vars": env},
                )
            else:
                ray.init(address=c.address, logging_level=logging.WARNING, runtime_env={"env_vars": env})
        bundle = {"CPU": c.cpus_per_worker, **({"GPU": c.gpus_per_worker} if c.gpus_per_worker else {})}
        self.pg = placement_group([bundle] * c.workers, strategy="PACK", name=f"metascale-{spec.name}-{os.getpid()}")
        ready, _ = ray.wait([self.pg.ready()], timeout=120)
        if not ready:
            raise ClusterError(
                f"the cluster cannot place {c.workers} workers of {bundle} within 120 s "
                f"(available: {ray.available_resources()}); lower cluster.workers or the per-worker resources"
            )
        actor_cls = ray.remote(MetaWorker)
        spec_json = spec.model_dump(mode="json")
        self.actors = [
            actor_cls.options(
                num_cpus=c.cpus_per_worker,
                num_gpus=c.gpus_per_worker,
                max_restarts=-1,
                max_task_retries=0,  # re-dispatch is ours: it may go to another worker
                runtime_env={"env_vars": env},
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
                name=f"metascale-{spec.name}-{os.getpid()}-worker-{i}",  # findable by operators (and fault tests)
            ).remote(spec_json, i)
            for i in range(c.workers)
        ]
        self.size = c.workers
        self.failures = 0
        ray.get([a.ping.remote() for a in self.actors])

    def put(self, value: Any) -> Any:
        """One object-store copy shared by every worker (one put, many gets)."""
        return self.ray.put(value)

    def map(self, method: str, groups: Sequence[Sequence[int]], *args: Any) -> list[Any]:
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, WorkerCrashedError

        lost = (RayActorError, ActorDiedError, ActorUnavailableError, WorkerCrashedError)
        results: list[Any] = [None] * len(groups)
        attempts = [0] * len(groups)
        pending = {}
        for i, group in enumerate(groups):
            pending[self._call(i % self.size, method, group, args)] = (i, i % self.size)
        while pending:
            done, _ = self.ray.wait(list(pending), num_returns=1)
            ref = done[0]
            i, worker = pending.pop(ref)
            try:
                results[i] = self.ray.get(ref)
            except lost as e:
                attempts[i] += 1
                self.failures += 1
                if attempts[i] >= self.MAX_ATTEMPTS:
                    raise ClusterError(f"slot group {i} failed {attempts[i]} times; last error: {e}") from None
                retry = (worker + attempts[i]) % self.size
                log.warning(
                    "worker %d was lost during '%s' (slots %s); recomputing them on worker %d",
                    worker, method, _span(groups[i]), retry,
                )
                time.sleep(0.2 * attempts[i])
                pending[self._call(retry, method, groups[i], args)] = (i, retry)
        return results

    def _call(self, worker: int, method: str, group: Sequence[int], args: tuple) -> Any:
        return getattr(self.actors[worker], method).remote(args[0], list(group), *args[1:])

    def shutdown(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for a in self.actors:
            self.ray.kill(a)
        remove_placement_group(self.pg)
        if self._owns_ray:
            self.ray.shutdown()


def _span(group: Sequence[int]) -> str:
    return f"{group[0]}-{group[-1]}" if len(group) > 1 else str(group[0])


def build_pool(spec: JobSpec) -> InlinePool | RayPool:
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
