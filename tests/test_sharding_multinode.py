"""Rank groups across nodes: a 2-node `ray.cluster_utils.Cluster` on 127.0.0.1 (real raylets and object stores),
2 rank groups of 2 ranks (gloo), one group a node (STRICT_PACK, 2 CPUs a node).

The aggregated meta-gradient equals the single-process one (ZeRO-3 FOMAML, ZeRO-2 second-order MAML); a rank killed
as a step starts, a node removed mid-run, and the driver SIGKILLed then resumed all end bit-identical to a fault-free
run; a ZeRO-3 group whose ranks span both nodes computes the same gradient (FOMAML, and second order: MAML reverse,
Meta-SGD mixed). Tolerances as in test_sharding_ranks.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
import ray
import torch
import yaml
from ray.cluster_utils import Cluster

from metascale.algorithms import build_algorithm
from metascale.algorithms.executor import meta_gradient
from metascale.cluster import checkpoint
from metascale.cluster.coordinator import Coordinator, aggregate
from metascale.cluster.estimators import items
from metascale.cluster.pool import RayPool
from metascale.config import JobSpec
from metascale.data import build_task_source, output_dim
from metascale.models import build_model
from metascale.train import train

pytest.importorskip("deepspeed")
STEPS = 4


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    os.environ["RAY_TMPDIR"] = str(tmp_path_factory.mktemp("ray"))  # Cluster's address file
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level="ERROR")
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()  # ends the processes it started, by pid


def job(root, name: str, **over: Any) -> JobSpec:
    base: dict[str, Any] = dict(
        name=name,
        model=dict(name="vit", dim=32, depth=2, heads=2),
        data=dict(source="synthetic", ways=3, shots=2, queries=2),
        algorithm=dict(name="fomaml", inner=dict(steps=1, lr=0.1)),
        outer=dict(meta_batch=4, steps=STEPS, lr=0.01),
        eval=dict(every=0, final_episodes=2),
        checkpoint=dict(dir=str(root / name), every=1),
        cluster=dict(workers=2, cpus_per_process=1),
        sharding=dict(engine="deepspeed", zero_stage=3, ranks=2),
        logging=dict(wandb=dict(mode="disabled"), progress=False),
    )
    for k, v in over.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return JobSpec.model_validate(base)


def final(spec: JobSpec) -> dict[str, torch.Tensor]:
    step, state = checkpoint.load_latest(spec.path(spec.checkpoint.dir))
    assert step == spec.outer.steps
    return state["params"]


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def aggregated_vs_single_process(spec: JobSpec) -> tuple[set[str], dict, dict]:
    """(the ranks' nodes, the coordinator's aggregated meta-gradient of step 1, the single-process mean)."""
    coord = Coordinator(spec)
    pool = RayPool(spec)
    try:
        nodes = [set(w.nodes()) for w in pool.workers]
        result = aggregate(pool.run(items("meta_gradient", 1, 4, pool.size), pool.put(coord.published())))
    finally:
        pool.shutdown()
    alg = build_algorithm(spec.algorithm, build_model(spec.model, output_dim(spec.data)))
    mg = meta_gradient(alg, coord.params, build_task_source(spec.data, "train", spec.seed).batch(1, range(4)))
    return nodes, result.grads, {k: g / 4 for k, g in mg.grads.items()}


def assert_close(got: dict, expected: dict) -> None:
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    for k, g in expected.items():
        assert float((got[k] - g).norm()) <= 1e-5 * max(float(g.norm()), 1e-6), k


@pytest.mark.parametrize("algorithm,zero", [("fomaml", 3), ("maml", 2)])
def test_two_groups_on_two_nodes_aggregate_the_single_process_gradient(two_nodes, tmp_path, algorithm, zero):
    spec = job(tmp_path, f"agg-{algorithm}", algorithm={"name": algorithm}, sharding={"zero_stage": zero})
    nodes, got, expected = aggregated_vs_single_process(spec)
    assert all(len(n) == 1 for n in nodes) and len(nodes[0] | nodes[1]) == 2, f"one group a node: {nodes}"
    assert_close(got, expected)


@pytest.mark.parametrize(
    "algorithm",
    [
        {"name": "fomaml"},
        {"name": "maml", "inner": {"steps": 2, "lr": 0.1, "differentiation": "reverse"}},
        {"name": "metasgd", "inner": {"steps": 2, "lr": 0.1, "differentiation": "mixed"}},
    ],
    ids=["fomaml", "maml-reverse", "metasgd-mixed"],
)
def test_a_group_spanning_both_nodes_computes_the_same_gradient(two_nodes, tmp_path, algorithm):
    """One ZeRO-3 group of 2 ranks of 2 CPUs each on 2-CPU nodes: PACK (span_nodes) must put one rank on each node,
    and the group's collectives cross between the nodes' raylets (second order, sharding/gathered.py: the gather of
    the whole meta-parameters and the all-reduce of the per-rank sums)."""
    spec = job(
        tmp_path,
        f"span-{algorithm['name']}",
        algorithm=algorithm,
        cluster={"workers": 1, "cpus_per_process": 2},
        sharding={"span_nodes": True},
    )
    nodes, got, expected = aggregated_vs_single_process(spec)
    assert len(nodes[0]) == 2, f"the group should span both nodes: {nodes}"
    assert_close(got, expected)


@pytest.fixture(scope="module")
def fault_free(two_nodes, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The final meta-parameters of the job every fault test below must end on."""
    spec = job(tmp_path_factory.mktemp("clean"), "clean")
    out = train(spec)
    assert out["worker_failures"] == 0
    return final(spec)


def test_a_rank_killed_as_a_step_starts_ends_bit_identical(two_nodes, fault_free, tmp_path, drill):
    fired = drill("exit:2:1:1")  # rank 1 of group 1, as meta-step 2 starts: rank 0 is then in the step's collectives
    spec = job(tmp_path, "rank-killed")
    out = train(spec)
    assert fired.exists() and out["worker_failures"] >= 1, out
    assert_identical(final(spec), fault_free)


def _metascale(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "metascale", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def test_driver_sigkill_then_resume_equals_an_uninterrupted_run(two_nodes, fault_free, tmp_path):
    """The driver (coordinator) of a sharded job is SIGKILLed once step 2's checkpoint exists; its actors die with
    it (Ray ends an owner's actors); `metascale run --resume` on the same cluster ends where a fault-free run ends."""
    spec = job(tmp_path, "driver-killed", cluster={"address": two_nodes.address})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    directory = spec.path(spec.checkpoint.dir)
    proc = _metascale("run", str(path))
    deadline = time.time() + 300
    while time.time() < deadline and not [s for s in checkpoint.list_steps(directory) if s >= 2]:
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # its own session: only this test's driver
    proc.wait(timeout=60)
    killed_at = checkpoint.list_steps(directory)[-1]
    assert 2 <= killed_at < STEPS, "the kill must land mid-run"
    resumed = _metascale("run", str(path), "--resume")
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out[-3000:]
    assert_identical(final(spec), fault_free)


def test_a_node_removed_mid_run_ends_bit_identical(two_nodes, fault_free, tmp_path):
    """Once step 2's checkpoint exists, the worker node is removed with the group on it. A spare node stands by (as
    an autoscaler or KubeRay would bring one; Cluster adds nodes from the main thread only): the lost group's slots
    are recomputed by the other group within the step, and the group is rebuilt on the spare."""
    two_nodes.add_node(num_cpus=2)
    spec = job(tmp_path, "node-removed")
    directory = spec.path(spec.checkpoint.dir)
    removed: list[list[int]] = []

    def remove_node():
        deadline = time.time() + 300
        while time.time() < deadline and 2 not in checkpoint.list_steps(directory):
            time.sleep(0.02)
        hosting = {
            node
            for pg in ray.util.placement_group_table().values()
            if pg["state"] == "CREATED" and pg["name"].startswith("metascale-node-removed-")
            for node in pg["bundles_to_node_id"].values()
        }
        victim = next(n for n in two_nodes.worker_nodes if n.node_id in hosting)  # never the head: it cannot go
        two_nodes.remove_node(victim)
        removed.append(checkpoint.list_steps(directory))

    thread = threading.Thread(target=remove_node, daemon=True)
    thread.start()
    out = train(spec)
    thread.join()
    assert removed and max(removed[0]) < STEPS, f"the node was not removed mid-run: {removed}"
    assert out["worker_failures"] >= 1, out
    assert_identical(final(spec), fault_free)
