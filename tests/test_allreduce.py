"""All-reduce aggregation on real Ray actors with a real gloo group: the reduced meta-gradient equals the coordinator's
sum, only rank 0's travels, and a worker killed mid-run costs a fallback step and a re-formed group, not results."""

from __future__ import annotations

import logging
import threading
import time

import pytest
import ray
import torch

from metascale.cluster import checkpoint
from metascale.cluster.allreduce import AllReduce
from metascale.cluster.coordinator import Coordinator, aggregate
from metascale.cluster.estimators import items
from metascale.cluster.pool import RayPool
from metascale.errors import SpecError
from metascale.train import train


def _kill_worker_1_after_checkpoint(spec, step: int, killed: list) -> threading.Thread:
    """Kills worker 1 as soon as the run's checkpoint of `step` exists: mid-run by construction, however slow."""

    def kill():
        deadline = time.time() + 120
        while time.time() < deadline and step not in checkpoint.list_steps(spec.path(spec.checkpoint.dir)):
            time.sleep(0.02)
        names = [
            a["name"]
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(f"metascale-{spec.name}-") and a["name"].endswith("worker-1")
        ]
        ray.kill(ray.get_actor(names[0]), no_restart=False)
        killed.append((names[0], checkpoint.list_steps(spec.path(spec.checkpoint.dir))))

    t = threading.Thread(target=kill, daemon=True)
    t.start()
    return t


def test_reduced_meta_gradient_equals_coordinator_aggregation(local_ray, tmp_path, make_job):
    spec = make_job(tmp_path, outer__meta_batch=7, cluster__workers=3, cluster__aggregation="allreduce")
    coord = Coordinator(spec)
    pool = RayPool(spec)
    group = AllReduce()
    try:
        params = pool.put(coord.published())
        reference = aggregate(pool.run(items("meta_gradient", 5, 7, 3), params))
        results = group.step(pool, items("meta_gradient", 5, 7, 3), params)
        again = group.step(pool, items("meta_gradient", 6, 7, 3), params)
    finally:
        pool.shutdown()
    assert [bool(r.grads) for r in results] == [True, False, False]  # only rank 0's sum travels
    assert group.formed == 1 and group.fallbacks == 0 and again[0].reduce_s is not None  # formed once, reused
    reduced = aggregate(results)
    assert reduced.tasks == reference.tasks == 7 and reduced.metrics == reference.metrics
    for k, g in reference.grads.items():
        assert torch.allclose(reduced.grads[k], g, rtol=0, atol=1e-10), k


def test_allreduce_needs_backprop_and_replicated_workers(tmp_path, make_job):
    with pytest.raises(SpecError, match="aggregation 'allreduce'"):
        make_job(tmp_path, cluster__aggregation="allreduce", outer__estimator="es")
    with pytest.raises(SpecError, match="rank group already reduces"):
        make_job(tmp_path, cluster__aggregation="allreduce", sharding__engine="deepspeed")


def test_killed_worker_falls_back_and_ends_with_the_fault_free_parameters(
    local_ray, tmp_path, caplog, make_job, ends_fault_free
):
    caplog.set_level(logging.INFO, logger="metascale.cluster.allreduce")
    # 2 workers: a + b == b + a, so the all-reduce run equals the coordinator run bit for bit (module docstring).
    clean = make_job(tmp_path / "clean", outer__steps=8, eval__every=0)
    train(clean)
    faulty = make_job(tmp_path / "faulty", outer__steps=8, eval__every=0, cluster__aggregation="allreduce")
    killed: list = []
    thread = _kill_worker_1_after_checkpoint(faulty, 2, killed)
    out = train(faulty)
    thread.join()
    assert killed and max(killed[0][1]) < 8, f"the fault was not injected mid-run: {killed}"
    assert "the coordinator aggregates this step" in caplog.text
    assert caplog.text.count("all-reduce group of 2 workers formed") >= 2  # re-formed after the fault
    ends_fault_free(out, faulty, clean)
