"""A 3-node `ray.cluster_utils.Cluster` on 127.0.0.1 with replica workers: a job runs end to end across nodes, the
aggregated meta-gradient equals the single-process one, and removing a node mid-run ends with bit-identical
parameters. (Rank-group workers across nodes: test_sharding_multinode.py.)"""

from __future__ import annotations

import os
import threading
import time

import pytest
import ray
import torch
from ray.cluster_utils import Cluster

from metascale.algorithms.executor import meta_gradient
from metascale.cluster import checkpoint
from metascale.cluster.coordinator import Coordinator, aggregate
from metascale.cluster.estimators import items
from metascale.cluster.pool import RayPool
from metascale.cluster.replica import Replica
from metascale.train import train


@pytest.fixture(scope="module")
def three_nodes(tmp_path_factory):
    # conftest.py keeps Ray on 127.0.0.1; Cluster needs a temp dir for its address file.
    assert os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    os.environ["RAY_TMPDIR"] = str(tmp_path_factory.mktemp("ray"))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level="ERROR")
        yield cluster, workers
    finally:
        ray.shutdown()
        cluster.shutdown()  # ends the processes it started, by pid


def test_aggregation_across_nodes_equals_single_process(three_nodes, tmp_path, make_job):
    spec = make_job(tmp_path, outer__meta_batch=6, cluster__workers=3)
    coord = Coordinator(spec)
    pool = RayPool(spec)
    try:
        nodes = set(ray.get([w.actor.node.remote() for w in pool.workers]))
        assert len(nodes) == 3, "one worker per node"
        result = aggregate(pool.run(items("meta_gradient", 3, 6, 3), pool.put(coord.published())))
    finally:
        pool.shutdown()
    worker = Replica(spec)
    reference = meta_gradient(
        worker.alg, coord.params, worker.source("train").batch(3, range(6)).to("cpu", torch.float64)
    )
    for k, g in reference.grads.items():
        assert torch.allclose(result.grads[k], g / 6, rtol=0, atol=1e-10), k


def _node_of_worker(job_prefix: str, bundle: int) -> str | None:
    for pg in ray.util.placement_group_table().values():
        if pg.get("name", "").startswith(job_prefix) and pg.get("state") == "CREATED":
            return pg["bundles_to_node_id"].get(bundle)
    return None


def test_removing_a_node_mid_run_ends_with_identical_parameters(three_nodes, tmp_path, make_job, ends_fault_free):
    cluster, workers = three_nodes
    clean = make_job(tmp_path / "clean", outer__steps=8, eval__every=0, checkpoint__every=1)
    train(clean)

    faulty = make_job(tmp_path / "faulty", outer__steps=8, eval__every=0, checkpoint__every=1)
    removed: list[tuple[str, list[int]]] = []

    def remove_node():
        """Removes a (non-head) node that hosts one of the job's workers once step 3's checkpoint exists."""
        deadline = time.time() + 300
        directory = faulty.path(faulty.checkpoint.dir)
        while time.time() < deadline and 3 not in checkpoint.list_steps(directory):
            time.sleep(0.02)
        hosting = {_node_of_worker("metascale-t-", b) for b in (0, 1)}
        victim = next(n for n in workers if n.node_id in hosting)
        cluster.remove_node(victim)
        removed.append((victim.node_id, checkpoint.list_steps(directory)))

    thread = threading.Thread(target=remove_node, daemon=True)
    thread.start()
    out = train(faulty)
    thread.join()
    assert removed and max(removed[0][1]) < 8, f"the node was not removed mid-run: {removed}"
    ends_fault_free(out, faulty, clean)
