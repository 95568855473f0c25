"""How a group of Ray actors becomes one torch.distributed process group, used by all-reduce aggregation
(cluster/allreduce.py) and by rank groups (sharding/rank.py).

Member 0 binds a listening socket on its own node's address (127.0.0.1 when every member shares a node), with a port
the OS chooses, and serves the group's TCPStore on that very socket: no port is guessed, and nothing listens on
other interfaces. The others connect to it; each binds gloo's pairs to the interface that carries its own node
address (addresses come from Ray, so a group may span nodes).
"""

from __future__ import annotations

import datetime
import os
import socket
from typing import Any


def bind(loopback: bool) -> tuple[socket.socket, str, int]:
    """Member 0: a listening socket on this node's address; (socket, address, port) for the others."""
    address = "127.0.0.1" if loopback else node_address()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((address, 0))
    sock.listen(128)
    return sock, address, sock.getsockname()[1]


def join(
    address: str,
    port: int,
    rank: int,
    world: int,
    listening: socket.socket | None,
    backend: str,
    timeout: datetime.timedelta,
    rendezvous: datetime.timedelta = datetime.timedelta(seconds=60),
    device: Any = None,
) -> None:
    """Joins generation (address, port) as `rank` of `world`; rank 0 passes the socket from `bind`. `timeout`
    bounds every collective, so a member whose peer hangs raises instead of waiting for ever; `rendezvous` bounds
    the wait for the others to arrive. `device` (NCCL): this member's GPU, for an eager NCCL start."""
    import torch.distributed as dist

    own = "127.0.0.1" if address == "127.0.0.1" else node_address()
    os.environ["GLOO_SOCKET_IFNAME"] = interface_of(own)
    if rank == 0:
        if listening is None:
            raise RuntimeError("rank 0 serves the store: bind its socket first")
        store = dist.TCPStore(address, port, world, True, rendezvous, master_listen_fd=listening.detach())
    else:
        store = dist.TCPStore(address, port, world, False, rendezvous)
    dist.init_process_group(
        backend,
        store=store,
        rank=rank,
        world_size=world,
        timeout=timeout,
        **({"device_id": device} if device is not None else {}),
    )


def node_address() -> str:
    import ray

    return ray.util.get_node_ip_address()


def interface_of(address: str) -> str:
    """The network interface that carries `address` (gloo binds its pairs there)."""
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == address for a in addrs):
            return name
    raise RuntimeError(f"no network interface has address {address}")
