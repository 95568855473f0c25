"""All-reduce aggregation (`cluster.aggregation: allreduce`): the workers sum their meta-gradients among themselves
in a torch.distributed process group (gloo on CPU, NCCL when the workers have GPUs), and only rank 0's reduced
gradient travels to the coordinator, so the coordinator's inbound traffic is one model-size message however many
workers there are (docs/distributed.md has the cost model).

Worker side (`join`, `reduced_compute`, called by MetaWorker): worker 0 binds a listening socket on the rendezvous
address (127.0.0.1 when every worker is on one node, else worker 0's node address) and the group's TCPStore is built
on that socket, so no port is guessed and no server listens on other interfaces. Each rank computes the summed
meta-gradient of its slot group, flattens it into one contiguous buffer, and all-reduces (sums) it.

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

log = logging.getLogger(__name__)

# Every member answered a ping just before joining, so the rendezvous is quick; a member that dies in between
# leaves the others waiting this long (and their next calls queued behind) before the group is tried again.
RENDEZVOUS_TIMEOUT = datetime.timedelta(seconds=30)
# A collective waits this long for the slowest rank's compute; a peer that dies is reported at once, not after it.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)

_listening: socket.socket | None = None  # worker 0's rendezvous socket, between `endpoint` and `join`


# ------------------------------------------------------------------------------------------------ worker side
def endpoint(loopback: bool) -> tuple[str, int]:
    """Worker 0: binds the rendezvous socket (an OS-chosen free port) and says where the others should connect."""
    global _listening
    address = "127.0.0.1" if loopback else _node_address()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((address, 0))
    sock.listen(128)
    if _listening is not None:
        _listening.close()
    _listening = sock
    return address, sock.getsockname()[1]


def join(address: str, port: int, rank: int, world: int, device: torch.device) -> None:
    """Leaves any previous (possibly broken) group and joins generation (address, port) as `rank` of `world`."""
    global _listening
    import os

    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    own = address if address == "127.0.0.1" else _node_address()
    os.environ["GLOO_SOCKET_IFNAME"] = _interface(own)  # gloo's pairs bind to this rank's own interface
    if rank == 0:
        if _listening is None:
            raise RuntimeError("join as rank 0 without a rendezvous socket (call endpoint first)")
        fd, _listening = _listening.detach(), None  # the store owns the socket from here on
        store = dist.TCPStore(address, port, world, True, RENDEZVOUS_TIMEOUT, master_listen_fd=fd)
    else:
        store = dist.TCPStore(address, port, world, False, RENDEZVOUS_TIMEOUT)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT,
                            **({"device_id": device} if device.type == "cuda" else {}))


def reduced_compute(out: dict[str, Any], grads: dict[str, torch.Tensor]) -> dict[str, Any]:
    """All-reduces this rank's summed meta-gradient `grads` (from `out`, a MetaWorker.compute result); rank 0 returns
    the reduced sum, the others return only their report (tasks, metrics, timing). If the collective fails (a peer
    died), the rank returns its own local sum instead, for the coordinator fallback."""
    import torch.distributed as dist

    t0 = time.perf_counter()
    names = list(grads)
    flat = torch.cat([grads[k].reshape(-1) for k in names])  # one contiguous buffer: one collective, one message
    try:
        dist.all_reduce(flat)
    except Exception as e:  # gloo/NCCL raise RuntimeError subclasses whose types vary by version and backend
        return {**out, "grads": _numpy(grads), "reduced": False, "error": str(e).splitlines()[0][:300]}
    reduce_s = time.perf_counter() - t0
    if dist.get_rank() != 0:
        return {**out, "grads": {}, "reduced": True, "reduce_s": reduce_s}
    host = flat.cpu()
    views, offset = {}, 0
    for k in names:
        n = grads[k].numel()
        views[k] = host[offset : offset + n].view(grads[k].shape).numpy()
        offset += n
    return {**out, "grads": views, "reduced": True, "reduce_s": reduce_s}


def _numpy(grads: dict[str, torch.Tensor]) -> dict[str, Any]:
    return {k: v.detach().cpu().numpy() for k, v in grads.items()}


def _node_address() -> str:
    import ray

    return ray.util.get_node_ip_address()


def _interface(address: str) -> str:
    """The network interface that carries `address` (gloo binds its pairs there)."""
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == address for a in addrs):
            return name
    raise RuntimeError(f"no network interface has address {address}")


# ------------------------------------------------------------------------------------------------ driver side
class AllReduce:
    """The driver's view of the group over a RayPool's first `world` actors: forms it, runs a step, falls back.
    It holds no reference to the pool (the estimator keeps one AllReduce per pool, weakly keyed)."""

    def __init__(self) -> None:
        self.world = 0  # 0: no working group (never formed, or broken by a lost worker)
        self.formed = 0  # how many times a group was formed (re-forms after faults)
        self.fallbacks = 0  # steps aggregated by the coordinator because the group broke

    def step(self, pool: Any, groups: Sequence[Sequence[int]], step: int, params_ref: Any) -> list[dict[str, Any]]:
        """Results in group order, for `coordinator.aggregate`: rank 0's carries the reduced sum, the others none."""
        if len(groups) == 1:
            return pool.map("compute", groups, step, params_ref)  # nothing to reduce
        if self.world != len(groups) and not self._form(pool, len(groups)):
            return self._fallback(pool, groups, step, params_ref, [None] * len(groups))
        ray = pool.ray
        refs = [pool.actors[i].compute_reduced.remote(step, list(g), params_ref) for i, g in enumerate(groups)]
        outcomes: list[dict[str, Any] | None] = []
        for ref in refs:
            try:
                outcomes.append(ray.get(ref))
            except _lost_errors():
                outcomes.append(None)
        if all(o is not None and o["reduced"] for o in outcomes):
            return outcomes  # type: ignore[return-value]
        lost = sum(o is None for o in outcomes)
        pool.failures += lost
        errors = sorted({o["error"] for o in outcomes if o is not None and not o["reduced"]})
        log.warning("step %d: the all-reduce failed (%d worker(s) lost%s); the coordinator aggregates this step and "
                    "the group is formed again at the next", step, lost, f"; {errors[0]}" if errors else "")
        return self._fallback(pool, groups, step, params_ref, outcomes)

    def _form(self, pool: Any, world: int) -> bool:
        ray = pool.ray
        actors = pool.actors[:world]
        try:
            ray.get([a.ping.remote() for a in actors])  # a restarting worker answers at once that it is restarting
            nodes = set(ray.util.placement_group_table(pool.pg)["bundles_to_node_id"].values())
            address, port = ray.get(actors[0].group_endpoint.remote(len(nodes) == 1))
            ray.get([a.group_join.remote(address, port, rank, world) for rank, a in enumerate(actors)])
        except _lost_errors() + (ray.exceptions.RayTaskError,) as e:
            log.warning("could not form the all-reduce group of %d workers (%s); the coordinator aggregates this "
                        "step and the group is formed again at the next", world, str(e).splitlines()[0][:200])
            self.world = 0
            return False
        self.world, self.formed = world, self.formed + 1
        log.info("all-reduce group of %d workers formed on %s:%d", world, address, port)
        return True

    def _fallback(self, pool: Any, groups: Sequence[Sequence[int]], step: int, params_ref: Any,
                  outcomes: list[dict[str, Any] | None]) -> list[dict[str, Any]]:
        """Coordinator aggregation for this step: keep the local sums of ranks whose collective failed, recompute the
        rest (lost workers' groups, and ranks that finished a collective others did not) through the pool."""
        self.world, self.fallbacks = 0, self.fallbacks + 1
        keep = [o if o is not None and not o["reduced"] else None for o in outcomes]
        redo = [i for i, o in enumerate(keep) if o is None]
        for i, result in zip(redo, pool.map("compute", [groups[i] for i in redo], step, params_ref)):
            keep[i] = result
        return keep  # type: ignore[return-value]


def _lost_errors() -> tuple[type[BaseException], ...]:
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, WorkerCrashedError

    return (RayActorError, ActorDiedError, ActorUnavailableError, WorkerCrashedError)
