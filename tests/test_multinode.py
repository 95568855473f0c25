"""A 3-node `ray.cluster_utils.Cluster` on 127.0.0.1: a job runs end to end across nodes, the aggregated
meta-gradient equals the single-process one, and removing a node mid-run ends with bit-identical parameters."""

from __future__ import annotations

import os
import threading
import time

import pytest
import ray
import torch
from ray.cluster_utils import Cluster

from metascale.algorithms.executor import meta_gradient
from metascale.cluster.coordinator import Coordinator, aggregate
from metascale.cluster.pool import RayPool, split_slots
from metascale.cluster.worker import MetaWorker
from metascale.train import train
from test_train import final_params, job


@pytest.fixture(scope="module")
def three_nodes(tmp_path_factory):
    # conftest.py keeps Ray on 127.0.0.1; Cluster needs a temp dir for its address file (FIELD-NOTES).
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


def test_aggregation_across_nodes_equals_single_process(three_nodes, tmp_path):
    spec = job(tmp_path, outer__meta_batch=6, cluster__workers=3)
    coord = Coordinator(spec)
    pool = RayPool(spec)
    try:
        nodes = set(ray.get([a.node.remote() for a in pool.actors]))
        assert len(nodes) == 3, "one worker per node"
        result = aggregate(pool.map("compute", split_slots(6, 3), 3, pool.put(coord.published())))
    finally:
        pool.shutdown()
    worker = MetaWorker(spec)
    reference = meta_gradient(worker.alg, coord.params, worker.source("train").batch(3, range(6)).to("cpu", torch.float64))
    for k, g in reference.grads.items():
        assert torch.allclose(result.grads[k], g / 6, rtol=0, atol=1e-10), k


def _node_of_worker(job_prefix: str, bundle: int) -> str | None:
    for pg in ray.util.placement_group_table().values():
        if pg.get("name", "").startswith(job_prefix) and pg.get("state") == "CREATED":
            return pg["bundles_to_node_id"].get(bundle)
    return None


def test_removing_a_node_mid_run_ends_with_identical_parameters(three_nodes, tmp_path):
    cluster, workers = three_nodes
    clean = job(tmp_path / "clean", outer__steps=8, eval__every=0)
    train(clean)
    reference = final_params(clean)

    faulty = job(tmp_path / "faulty", outer__steps=8, eval__every=0)
    removed: list[str] = []

    def remove_node():
        """Removes a (non-head) node that hosts one of the job's workers, once the run is under way."""
        deadline = time.time() + 120
        while time.time() < deadline:
            hosting = {_node_of_worker("metascale-t-", b) for b in (0, 1)}
            victim = next((n for n in workers if n.node_id in hosting), None)
            if victim is not None:
                time.sleep(1.5)  # into the run: meta-steps are in flight
                cluster.remove_node(victim)
                removed.append(victim.node_id)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=remove_node, daemon=True)
    thread.start()
    out = train(faulty)
    thread.join()
    assert removed, "no worker node was removed"
    assert out["status"] == "finished"
    got = final_params(faulty)
    for k in reference:
        assert torch.equal(reference[k], got[k]), k
