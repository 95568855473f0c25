"""Sharded inner loops against the un-sharded single-process path: real DeepSpeed, 2 ranks, gloo on 127.0.0.1.

One rank group serves the whole module (starting one costs ~10 s of imports); each check builds its own engine in
the ranks. Float32 tolerance for "equal": rtol 1e-4, atol 1e-6 (measured differences are ~1e-7 absolute: the
ranks sum partial gradients in another order than one process does).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from metascale.algorithms import build_algorithm
from metascale.algorithms.executor import meta_gradient
from metascale.cluster.coordinator import Coordinator, StepResult
from metascale.config import JobSpec
from metascale.data import build_task_source, output_dim
from metascale.models import build_model
from metascale.sharding.launch import RANK_STATE, RankGroup

pytest.importorskip("deepspeed")
TOL = {"rtol": 1e-4, "atol": 1e-6}
SLOTS = [0, 1]


def job(**over: Any) -> JobSpec:
    base: dict[str, Any] = dict(
        model=dict(name="vit", dim=32, depth=2, heads=2),
        data=dict(source="synthetic", ways=3, shots=2, queries=2),
        algorithm=dict(name="fomaml", inner=dict(steps=2, lr=0.1)),
        outer=dict(meta_batch=2, lr=0.01),
        sharding=dict(engine="deepspeed", zero_stage=3, ranks=2),
    )
    for k, v in over.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return JobSpec.model_validate(base)


def reference(spec: JobSpec) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The un-sharded per-task executor: (initial meta-parameters, mean meta-gradient over SLOTS)."""
    torch.manual_seed(spec.seed)
    model = build_model(spec.model, output_dim(spec.data))
    alg = build_algorithm(spec.algorithm, model)
    params = {k: v.detach().clone() for k, v in alg.init(dict(model.named_parameters())).items()}
    batch = build_task_source(spec.data, "train", spec.seed).batch(0, SLOTS)
    grads = meta_gradient(alg, params, batch, "per_task").grads
    return params, {k: g / len(SLOTS) for k, g in grads.items()}


def assemble(per_rank: list[dict[str, torch.Tensor]], like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole tensors from the ranks' partitions (test-only: the runtime never does this)."""
    out = {}
    for k, v in like.items():
        parts = [r[k].reshape(-1) for r in per_rank]
        whole = parts[0] if parts[0].numel() == v.numel() else torch.cat(parts)[: v.numel()]
        out[k] = whole.reshape(v.shape)
    return out


# ------------------------------------------------------------------------------- run inside each rank
def _learner(spec_json: dict, init: dict[str, torch.Tensor]) -> Any:
    from metascale.sharding.worker import build_learner

    spec = JobSpec.model_validate(spec_json)
    learner = build_learner(spec, RANK_STATE["rank"], RANK_STATE["world"])
    learner.load_full(init)
    return spec, learner


def mean_direction(spec_json: dict, init: dict[str, torch.Tensor], lite: bool = False) -> dict[str, Any]:
    from metascale.sharding.worker import lite_generator

    spec, learner = _learner(spec_json, init)
    tasks = build_task_source(spec.data, "train", spec.seed).batch(0, SLOTS).tasks()
    total: dict[str, torch.Tensor] = {}
    for slot, task in zip(SLOTS, tasks):
        direction, _ = learner.task_direction(task, lite_generator(spec.seed, 0, slot) if lite else None)
        total = {k: total.get(k, 0) + d for k, d in direction.items()}
    params = list(learner.engine.module.parameters())
    return {
        "direction": {k: v / len(SLOTS) for k, v in total.items()},
        "local_numel": sum(p.ds_tensor.numel() for p in params),
        "whole_numel": sum(p.ds_numel for p in params),
        "resident_numel": sum(p.numel() for p in params),  # whole copies left gathered after the step
        "meta_numel": sum(v.numel() for v in learner.meta.values()),
    }


def meta_steps(spec_json: dict, init: dict[str, torch.Tensor], steps: int) -> dict[str, torch.Tensor]:
    spec, learner = _learner(spec_json, init)
    source = build_task_source(spec.data, "train", spec.seed)
    for step in range(steps):
        learner.meta_step(step, source.batch(step, SLOTS).tasks(), [None] * len(SLOTS))
    if hasattr(learner, "meta"):
        return {k: v.detach().clone() for k, v in learner.meta.items()}
    return {k: v.detach().clone() for k, v in learner.params().items()}


# ------------------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def group():
    with RankGroup(2, timeout_s=300) as g:
        yield g


@pytest.mark.parametrize("algorithm", [
    {"name": "fomaml"}, {"name": "reptile"},
    {"name": "anil", "inner": {"steps": 2, "lr": 0.1, "first_order": True}},  # head adapts, sharded body frozen
], ids=["fomaml", "reptile", "anil-first-order"])
def test_zero3_first_order_equals_unsharded(group, algorithm):
    spec = job(algorithm=algorithm)
    init, expected = reference(spec)
    results = group.call(mean_direction, spec.model_dump(mode="json"), init)
    torch.testing.assert_close(assemble([r["direction"] for r in results], expected), expected, **TOL)
    r0 = results[0]
    # ZeRO-3: each rank owns ~1/2 of every parameter (plus padding to an even split), and holds no whole copy.
    assert r0["whole_numel"] / 2 <= r0["local_numel"] <= r0["whole_numel"] / 2 + len(expected)
    assert r0["meta_numel"] == r0["local_numel"] and r0["resident_numel"] == 0


def test_activation_checkpointing_same_gradients(group):
    plain = job()
    init, expected = reference(plain)  # un-sharded, no checkpointing
    spec = job(sharding={"activation_checkpointing": True})
    results = group.call(mean_direction, spec.model_dump(mode="json"), init)
    torch.testing.assert_close(assemble([r["direction"] for r in results], expected), expected, **TOL)


def test_lite_with_whole_support_equals_full_gradient(group):
    spec = job(sharding={"support_backprop_subset": 6})  # 3 ways x 2 shots
    init, expected = reference(job())
    results = group.call(mean_direction, spec.model_dump(mode="json"), init, True)
    torch.testing.assert_close(assemble([r["direction"] for r in results], expected), expected, **TOL)


def test_zero3_meta_optimiser_on_partitions_equals_coordinator(group):
    """Two FOMAML meta-steps with Adam kept on the ranks' partitions == the coordinator's whole-model Adam, both
    following a 2-step warm-up (outer.schedule: rates lr/2, then lr)."""
    spec = job(outer={"schedule": {"warmup_steps": 2}})
    coord = Coordinator(spec)
    init = {k: v.detach().clone() for k, v in coord.params.items()}
    source = build_task_source(spec.data, "train", spec.seed)
    smallest = {k: torch.full_like(v, float("inf")) for k, v in init.items()}
    for step in range(2):
        mg = meta_gradient(coord.algorithm, coord.params, source.batch(step, SLOTS), "per_task")
        smallest = {k: torch.minimum(smallest[k], g.abs() / mg.tasks) for k, g in mg.grads.items()}
        coord.apply(StepResult({k: g / mg.tasks for k, g in mg.grads.items()}, mg.tasks, {}, {0: 0.0}, 0.0))
    results = group.call(meta_steps, spec.model_dump(mode="json"), init, 2)
    # Adam's step lr * m / (sqrt(v) + eps) is ~lr * sign(g) however small g is, so where the true gradient is ~0
    # (e.g. attention's key bias, exactly 0 in exact arithmetic) the 1e-9 summation-order noise decides the step.
    # Compare where both steps' gradients are above that noise (>= 1e-6), nearly every element, to 0.1% of one step.
    real = {k: m >= 1e-6 for k, m in smallest.items()}
    assert sum(int(r.sum()) for r in real.values()) > 0.9 * sum(r.numel() for r in real.values())
    got = assemble(results, init)
    for k, p in coord.params.items():
        torch.testing.assert_close(got[k][real[k]], p.detach()[real[k]], rtol=1e-4, atol=1e-3 * spec.outer.lr)


@pytest.mark.parametrize("algorithm", ["maml", "metasgd"])
def test_second_order_zero2_equals_plain_torch(group, algorithm):
    """Second order at ZeRO-2, one task per rank; outer SGD at rate 1 makes the step equal the meta-gradient. The
    rate is outer.lr 2 halved by a 2-step warm-up: the DeepSpeed engine's optimiser follows outer.schedule."""
    spec = job(algorithm={"name": algorithm, "inner": {"steps": 1, "lr": 0.1}},
               outer={"optimizer": "sgd", "lr": 2.0, "schedule": {"warmup_steps": 2}}, sharding={"zero_stage": 2})
    init, expected = reference(spec)
    results = group.call(meta_steps, spec.model_dump(mode="json"), init, 1)
    step = {k: init[k] - results[0][k] for k in init}
    torch.testing.assert_close(step, expected, **TOL)
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=0)  # replicated: every rank has the same update


# ------------------------------------------------------------------------------- non-finite tasks
def poisoned_step(spec_json: dict, init: dict[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """One meta-step over SLOTS with slot 1's query set poisoned by a NaN; (result, meta-parameters after)."""
    import dataclasses

    spec, learner = _learner(spec_json, init)
    tasks = build_task_source(spec.data, "train", spec.seed).batch(0, SLOTS).tasks()
    qx = tasks[1].query_x.clone()
    qx[0] = float("nan")
    tasks[1] = dataclasses.replace(tasks[1], query_x=qx)
    result = learner.meta_step(0, tasks, [None] * len(tasks))
    params = learner.meta if hasattr(learner, "meta") else learner.params()
    return result, {k: v.detach().clone() for k, v in params.items()}


def _slot0_gradient(spec: JobSpec, init: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    torch.manual_seed(spec.seed)
    alg = build_algorithm(spec.algorithm, build_model(spec.model, output_dim(spec.data)))
    return meta_gradient(alg, init, build_task_source(spec.data, "train", spec.seed).batch(0, [0]), "per_task").grads


@pytest.mark.parametrize("algorithm,zero,policy", [
    ("fomaml", 3, "skip_task"), ("fomaml", 3, "skip_step"), ("maml", 2, "skip_task"),
])
def test_nonfinite_task_policies_under_sharding(group, algorithm, zero, policy):
    """skip_task: the poisoned task adds nothing (first order: the mean is over the finite tasks; second order: the
    engine still divides by every task); skip_step: nothing moves. Outer SGD with lr 1: the update is the gradient."""
    spec = job(algorithm={"name": algorithm, "inner": {"steps": 1, "lr": 0.1}}, outer={"optimizer": "sgd", "lr": 1.0},
               sharding={"zero_stage": zero}, executor={"nonfinite": policy})
    init, _ = reference(spec)
    results = group.call(poisoned_step, spec.model_dump(mode="json"), init)
    assert all(r[0]["nonfinite"] == [1] for r in results)
    got = assemble([r[1] for r in results], init) if zero == 3 else results[0][1]
    if policy == "skip_step":
        assert results[0][0]["tasks"] == 0
        torch.testing.assert_close(got, init, rtol=0, atol=0)
        return
    assert results[0][0]["tasks"] == 1
    scale = 1.0 if zero == 3 else 0.5  # second order: (g0 + 0) / 2
    expected = {k: init[k] - scale * g for k, g in _slot0_gradient(spec, init).items()}
    torch.testing.assert_close(got, expected, **TOL)


def test_nonfinite_stop_raises_on_every_rank_before_the_update():
    from metascale.sharding.launch import RankGroupError

    spec = job(executor={"nonfinite": "stop"})
    init, _ = reference(spec)
    with RankGroup(2, timeout_s=300) as g, pytest.raises(RankGroupError, match="NonFiniteError: non-finite"):
        g.call(poisoned_step, spec.model_dump(mode="json"), init)
