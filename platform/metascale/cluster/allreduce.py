"""All-reduce aggregation (`cluster.aggregation: allreduce`): the workers sum their meta-gradients among themselves
in a torch.distributed process group (gloo on CPU, NCCL when the workers have GPUs), and only rank 0's reduced
gradient travels to the coordinator, so the coordinator's inbound traffic is one model-size message however many
workers there are (docs/distributed.md has the cost model).

Worker side (`endpoint`, `join`, `reduced`, called by the replicas): the group forms as every group of actors here
does (cluster/rendezvous.py: replica 0 serves the store on a socket it bound, on loopback when every replica shares a
node). Each rank computes the summed meta-gradient of its slot group, flattens it into one contiguous buffer, and
all-reduces (sums) it.

Driver side (`AllReduce`): a dead worker breaks the group (gloo reports "connection closed by peer" at once). That
step falls back to coordinator aggregation: survivors whose all-reduce failed return their local sums, lost groups
are recomputed through the pool's re-dispatch, and everything is summed in slot-group order, exactly as the
coordinator path would. The group is re-formed at the next step.

Determinism: the reduced sum is a different association of the same float additions than the coordinator's
left-to-right sum in group order. With 2 workers it is bit-identical (a + b == b + a in IEEE arithmetic); with 3 or
more, ring/halving-doubling chunks associate differently and results agree to rounding (tests: < 1e-10, float64).
"""

from __future__ import annotations

import datetime
import logging
import socket
import time
from typing import Any, Sequence

import torch

from metascale.cluster import rendezvous
from metascale.cluster.messages import WorkItem, WorkResult

log = logging.getLogger(__name__)

# A collective waits this long for the slowest rank's compute; a peer that dies is reported at once, not after it,
# and a peer that hangs is found sooner by the driver's own limit (cluster.timeout), which then ends it.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)

_listening: socket.socket | None = None  # replica 0's rendezvous socket, between `endpoint` and `join`


# ------------------------------------------------------------------------------------------------ worker side
def endpoint(loopback: bool) -> tuple[str, int]:
    """Replica 0: binds the rendezvous socket (an OS-chosen free port) and says where the others should connect."""
    global _listening
    if _listening is not None:
        _listening.close()
    _listening, address, port = rendezvous.bind(loopback)
    return address, port


def join(address: str, port: int, rank: int, world: int, device: torch.device) -> None:
    """Leaves any previous (possibly broken) group and joins generation (address, port) as `rank` of `world`."""
    global _listening
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    listening = None
    if rank == 0:
        listening, _listening = _listening, None  # the store owns the socket from here on
    backend = "nccl" if device.type == "cuda" else "gloo"
    rendezvous.join(
        address,
        port,
        rank,
        world,
        listening,
        backend,
        COLLECTIVE_TIMEOUT,
        device=device if device.type == "cuda" else None,
    )


def reduced(out: WorkResult, grads: dict[str, torch.Tensor]) -> WorkResult:
    """All-reduces this rank's summed meta-gradient `grads` (the rest of its result in `out`): rank 0 returns the
    reduced sum, the others only their report (tasks, metrics, timing). If the collective fails (a peer died), the
    rank returns its own local sum instead, with `reduce_s` None, for the coordinator's fallback."""
    import torch.distributed as dist

    t0 = time.perf_counter()
    names = list(grads)
    flat = torch.cat([grads[k].reshape(-1) for k in names])  # one contiguous buffer: one collective, one message
    try:
        dist.all_reduce(flat)
    except Exception as e:  # gloo/NCCL raise RuntimeError subclasses whose types vary by version and backend
        log.warning(
            "worker %d: the all-reduce failed (%s); sending the local sum", out.worker, str(e).splitlines()[0][:300]
        )
        out.grads = {k: v.detach().cpu().numpy() for k, v in grads.items()}
        return out
    out.reduce_s = time.perf_counter() - t0
    if dist.get_rank() != 0:
        return out
    host = flat.cpu()
    offset = 0
    for k in names:
        n = grads[k].numel()
        out.grads[k] = host[offset : offset + n].view(grads[k].shape).numpy()
        offset += n
    return out


# ------------------------------------------------------------------------------------------------ driver side
class AllReduce:
    """The driver's view of the group over a RayPool's first `world` replicas: forms it, runs a step, falls back.
    It holds no reference to the pool (the estimator keeps one AllReduce per pool, weakly keyed)."""

    def __init__(self) -> None:
        self.world = 0  # 0: no working group (never formed, or broken by a lost worker)
        self.formed = 0  # how many times a group was formed (re-forms after faults)
        self.fallbacks = 0  # steps aggregated by the coordinator because the group broke

    def step(self, pool: Any, items: Sequence[WorkItem], params: Any) -> list[WorkResult]:
        """Results in item order, for `coordinator.aggregate`: rank 0's carries the reduced sum, the others none."""
        if len(items) == 1:
            return pool.run(items, params)  # nothing to reduce
        if self.world != len(items) and not self._form(pool, len(items)):
            return self._fallback(pool, items, params, [None] * len(items))
        ray = pool.ray
        replicas = pool.workers[: len(items)]
        refs = [w.actor.run_reduced.remote(item, params) for w, item in zip(replicas, items)]
        limit = max(pool.limit(item, w) for w, item in zip(replicas, items))
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=limit)
        outcomes: list[WorkResult | None] = []
        for w, ref in zip(replicas, refs):
            try:
                outcomes.append(ray.get(ref) if ref in done else None)
            except _lost_errors():
                outcomes.append(None)
            if ref not in done:
                w.restart(hung=True)  # no answer within its limit: ended, and started again by Ray
        if all(o is not None and o.reduce_s is not None for o in outcomes):
            return outcomes  # type: ignore[return-value]
        lost = sum(o is None for o in outcomes)
        pool.failures += lost
        log.warning(
            "step %s: the all-reduce failed (%d worker(s) lost); the coordinator aggregates this step and "
            "the group is formed again at the next",
            items[0].step,
            lost,
        )
        return self._fallback(pool, items, params, outcomes)

    def _form(self, pool: Any, world: int) -> bool:
        ray = pool.ray
        actors = [w.actor for w in pool.workers[:world]]
        limit = pool.spec.cluster.timeout.startup_s
        try:
            ray.get([a.ping.remote() for a in actors], timeout=limit)  # a restarting worker answers when it is back
            nodes = set(ray.util.placement_group_table(pool.pg)["bundles_to_node_id"].values())
            address, port = ray.get(actors[0].group_endpoint.remote(len(nodes) == 1), timeout=limit)
            ray.get([a.group_join.remote(address, port, rank, world) for rank, a in enumerate(actors)], timeout=limit)
        except _lost_errors() + (ray.exceptions.RayTaskError, ray.exceptions.GetTimeoutError) as e:
            log.warning(
                "could not form the all-reduce group of %d workers (%s); the coordinator aggregates this "
                "step and the group is formed again at the next",
                world,
                str(e).splitlines()[0][:200],
            )
            self.world = 0
            return False
        self.world, self.formed = world, self.formed + 1
        log.info("all-reduce group of %d workers formed on %s:%d", world, address, port)
        return True

    def _fallback(
        self, pool: Any, items: Sequence[WorkItem], params: Any, outcomes: list[WorkResult | None]
    ) -> list[WorkResult]:
        """Coordinator aggregation for this step: keep the local sums of ranks whose collective failed, recompute the
        rest (lost workers' items, and ranks that finished a collective others did not) through the pool."""
        self.world, self.fallbacks = 0, self.fallbacks + 1
        keep = [o if o is not None and o.reduce_s is None else None for o in outcomes]
        redo = [i for i, o in enumerate(keep) if o is None]
        for i, result in zip(redo, pool.run([items[i] for i in redo], params)):
            keep[i] = result
        return keep  # type: ignore[return-value]


def _lost_errors() -> tuple[type[BaseException], ...]:
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, WorkerCrashedError

    return (RayActorError, ActorDiedError, ActorUnavailableError, WorkerCrashedError)
