"""Rank-group workers against the un-sharded single-process executor: real DeepSpeed engines in real Ray actors,
2 ranks joined over gloo, driven through the pool exactly as the training loop drives them.

Float32 throughout: DeepSpeed refuses float64 (zero.Init asserts on it; ZeRO-2 returns float32 gradients for a
float64 model). "Equal" is therefore rtol 1e-4, atol 1e-6 elementwise and 1e-5 in norm per parameter: measured
differences are ~1e-7 absolute, ~1e-6 in norm (the ranks reduce partial gradients in another order than one
process sums them); a wrong partition, a missed task or a wrong scale is off by orders of magnitude more. The
`sharding.precision: bf16` cases are held to a bf16 rounding bound instead (assert_within_bf16_bound).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from metascale.algorithms import build_algorithm
from metascale.algorithms.executor import meta_gradient
from metascale.cluster.coordinator import Coordinator, aggregate
from metascale.cluster.estimators import items
from metascale.cluster.pool import RayPool
from metascale.config import JobSpec, ResNet12Spec
from metascale.data import build_task_source, output_dim
from metascale.data.tasks import TaskBatch
from metascale.models import build_model

pytest.importorskip("deepspeed")
# float32 against plain torch, summed in another order (support chunks, rank groups): on an AMD EPYC the ViT's support
# chunks of 4 and 2 put one of 32 class-token entries 5.0e-6 (1.7e-4 relative) off; exactness is float64's, in
# test_mixed_mode.py
TOL = {"rtol": 1e-4, "atol": 1e-5}
CKPT, BF16 = {"activation_checkpointing": True}, {"precision": "bf16"}
# a spec, not a dict: it replaces job()'s ViT whole. 3 channels: with 1 its first 1x1 shortcut conv, followed by batch
# norm, is scale-invariant, its gradient ~0 and float32 rounding noise, which no relative bound can hold
RESNET12 = {"model": ResNet12Spec(in_channels=3, channels=[4, 8]), "data": {"channels": 3}}
BF16_UNIT = 2.0**-8  # bf16 keeps 8 significant bits: one rounding to bf16 errs by at most 2^-8 of the value


def job(**over: Any) -> JobSpec:
    base: dict[str, Any] = dict(
        name="ranks",
        model=dict(name="vit", dim=32, depth=2, heads=2),
        data=dict(source="synthetic", ways=3, shots=2, queries=2),
        algorithm=dict(name="fomaml", inner=dict(steps=2, lr=0.1)),
        outer=dict(meta_batch=3, lr=0.01),
        cluster=dict(workers=1, cpus_per_process=0.5),
        sharding=dict(engine="deepspeed", zero_stage=3, ranks=2),
        logging=dict(wandb=dict(mode="disabled")),
    )
    for k, v in over.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return JobSpec.model_validate(base)


def reference(spec: JobSpec, params: dict[str, torch.Tensor], step: int, slots: list[int]) -> dict[str, torch.Tensor]:
    """The un-sharded per-task executor's summed meta-gradient of episodes (step, slot)."""
    alg = build_algorithm(spec.algorithm, build_model(spec.model, output_dim(spec.data)))
    batch = build_task_source(spec.data, "train", spec.seed).batch(step, slots)
    return meta_gradient(alg, params, batch, "per_task").grads


def whole(result: Any) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v) for k, v in result.grads.items()}


def assert_equal(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    torch.testing.assert_close(got, expected, **TOL)
    for k, g in expected.items():
        assert float((got[k] - g).norm()) <= 1e-5 * max(float(g.norm()), 1e-6), k


def as_dtype(params: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(dtype) for k, v in params.items()}


def assert_within_bf16_bound(
    got: dict[str, torch.Tensor],
    spec: JobSpec,
    plain: JobSpec,
    params: dict[str, torch.Tensor],
    step: int,
    slots: list[int],
) -> None:
    """sharding.precision bf16: the ranks hold the meta-parameters in bf16 and run each task wholly in bf16, the same
    ops plain torch runs on the same bf16 weights and episodes, so each task's meta-gradient g_t is the same bits.
    Only the sum may differ: ZeRO-3 adds the tasks in float32, as here; at stages 0-2 DeepSpeed reduces each round's
    rank gradients in bf16, rounding each round's sum once, so |got - expected| <= 2^-8 sum_t |g_t| elementwise
    (+ float32 rounding; measured at ZeRO-1: up to 0.7 of that bound, 11x a bound of 2^-12). Against float32 (`plain`: reverse mode, one query pass) the bf16 meta-gradient is ~4-9% off
    in norm (8 bits through the inner steps and the sweep), so there only its direction is checked."""
    alg = build_algorithm(spec.algorithm, build_model(spec.model, output_dim(spec.data)))
    batch = build_task_source(spec.data, "train", spec.seed).batch(step, slots)
    low = as_dtype(params, torch.bfloat16)
    per_task = [meta_gradient(alg, low, TaskBatch.stack([t.to("cpu", torch.bfloat16)])).grads for t in batch.tasks()]
    assert got.keys() == low.keys()
    for k in low:
        expected = sum(g[k].float() for g in per_task)
        bound = BF16_UNIT * sum(g[k].float().abs() for g in per_task) + 1e-6 * expected.abs().max() + 1e-12
        assert ((got[k] - expected).abs() <= bound).all(), (k, float(((got[k] - expected).abs() / bound).max()))
    exact = reference(plain, params, step, slots)
    flat = [torch.cat([d[k].flatten() for k in exact]) for d in (got, exact)]
    assert float(torch.nn.functional.cosine_similarity(*flat, dim=0)) > 0.99


def sharded_step(
    spec: JobSpec, step: int, *, drill_slot: int | None = None, drill=None, episodes: list | None = None
) -> tuple[Any, Any, Any]:
    """One meta_gradient item of `spec`'s slots at `step` through a pool of one rank group: (result, the
    coordinator's parameters, what each rank holds). With `episodes`, an evaluate item of the same episodes runs
    after it and its per-episode metrics are appended there."""
    if drill_slot is not None:
        drill(f"nan:{step}:{drill_slot}")
    coord = Coordinator(spec)
    pool = RayPool(spec)
    try:
        published = pool.put(coord.published())
        [result] = pool.run(items("meta_gradient", step, spec.outer.meta_batch, 1), published)
        held = pool.workers[0].held()
        if episodes is not None:
            [scored] = pool.run(items("evaluate", step, spec.outer.meta_batch, 1), published)
            episodes += scored.episodes
    finally:
        pool.shutdown()
    return result, coord.params, held


@pytest.mark.parametrize(
    "algorithm",
    [
        {"name": "fomaml"},
        {"name": "reptile"},
        {"name": "anil", "inner": {"steps": 2, "lr": 0.1, "first_order": True}},  # head adapts, sharded body frozen
    ],
    ids=["fomaml", "reptile", "anil-first-order"],
)
def test_zero3_first_order_equals_unsharded_and_each_rank_holds_half(local_ray, algorithm):
    spec = job(algorithm=algorithm)
    result, params, held = sharded_step(spec, 4)
    assert result.tasks == 3 and not result.nonfinite_slots
    assert_equal(whole(result), reference(spec, params, 4, [0, 1, 2]))
    # ZeRO-3: each rank owns ~1/2 of every parameter (plus padding to an even split), and holds no whole copy.
    for r in held:
        assert r["whole_numel"] / 2 <= r["local_numel"] <= r["whole_numel"] / 2 + len(params)
        assert r["resident_numel"] == 0


def test_activation_checkpointing_and_lite_over_the_whole_support_keep_the_gradient(local_ray):
    """Per-block recomputation and LITE with H = N (every support example back-propagated) change nothing."""
    spec = job(sharding={"activation_checkpointing": True, "support_backprop_subset": 6})  # 3 ways x 2 shots
    result, params, held = sharded_step(spec, 1)
    assert all(r["checkpointed_modules"] == 1 for r in held)  # the ViT's blocks recompute (counted in one process:
    # test_sharding_checkpointing.py)
    assert_equal(whole(result), reference(job(), params, 1, [0, 1, 2]))


@pytest.mark.parametrize(
    "algorithm,zero,mode,extra",
    [
        ("maml", 2, "reverse", {}),
        ("metasgd", 0, "reverse", {}),
        ("maml", 3, "reverse", {}),
        ("metasgd", 3, "mixed", {}),  # ZeRO-3 gathers the whole tensors (sharding/gathered.py)
        ("maml", 0, "mixed", {}),
        ("metasgd", 2, "mixed", {}),  # mixed mode's sweep is the backward engine.backward runs
        ("maml", 1, "mixed", {"inner": {"query_chunk": 4}}),  # ZeRO-1; the query pass in chunks of 4 and 2
        # bf16: against plain torch in bf16, see the bound; learned_hparams' rates and decays are 0-dim tensors
        ("learned_hparams", 1, "mixed", {"sharding": BF16}),
        # per-block recomputation with the adapted weights: mixed mode's query pass; reverse's inner steps too
        ("maml", 3, "mixed", {"sharding": {**BF16, **CKPT}}),
        ("learned_loss", 2, "mixed", {"sharding": CKPT, "inner": {"steps": 3, "mixed_stride": 2}}),
        ("learned_hparams", 3, "mixed", {"sharding": CKPT, "inner": {"query_chunk": 4}}),
        ("maml", 2, "reverse", {"sharding": CKPT}),
        # support chunks of 4 and 2 of the 6 examples, weighted 4/6 and 2/6 (algorithms/mixed_mode.py: _Support)
        ("metasgd", 3, "mixed", {"sharding": CKPT, "inner": {"support_chunk": 4}}),
        ("maml", 1, "mixed", {"sharding": BF16, "inner": {"support_chunk": 4}}),
        # whole-model support products run the blocks plainly under activation checkpointing (torch.func refuses it)
        ("maml", 2, "mixed", {"sharding": CKPT, "inner": {"mixed_blocks": False}}),
        # ResNet-12's per-task batch norm: each stage part in chunks of 4 and 2, its statistics explicit (norm_chunks)
        ("metasgd", 3, "mixed", {"sharding": CKPT, "inner": {"support_chunk": 4}, **RESNET12}),
    ],
    ids=[
        "maml-2-reverse",
        "metasgd-0-reverse",
        "maml-3-reverse",
        "metasgd-3-mixed",
        "maml-0-mixed",
        "metasgd-2-mixed",
        "maml-1-mixed-chunk4",
        "learned_hparams-1-mixed-bf16",
        "maml-3-mixed-bf16-ckpt",
        "learned_loss-2-mixed-ckpt-stride2",
        "learned_hparams-3-mixed-ckpt-chunk4",
        "maml-2-reverse-ckpt",
        "metasgd-3-mixed-ckpt-support4",
        "maml-1-mixed-bf16-support4",
        "maml-2-mixed-ckpt-whole",
        "metasgd-3-mixed-ckpt-support4-resnet12",
    ],
)
def test_second_order_equals_plain_torch(local_ray, algorithm, zero, mode, extra):
    """3 tasks over 2 ranks: the second round has a task on rank 0 only (stages 0-2: rank 1 back-propagates a blank).
    ZeRO-3 gathers the meta-parameters for the item and releases them after: at rest each rank holds only its
    partitions (Meta-SGD's learning rates included) and no whole copy. bf16 is held to the rounding bound of
    `assert_within_bf16_bound`; activation checkpointing must recompute each block with the adapted weights that
    functional_call substituted (with the module's own, the gradients were ~0.4 off at stage 2; ZeRO-3 failed)."""
    inner = {"steps": 2, "lr": 0.1, "differentiation": mode, **extra.get("inner", {})}
    sharding = {"zero_stage": zero, **extra.get("sharding", {})}
    model = {k: extra[k] for k in ("model", "data") if k in extra}
    spec = job(algorithm={"name": algorithm, "inner": inner}, sharding=sharding, **model)
    plain = job(algorithm={"name": algorithm, "inner": {"steps": inner["steps"], "lr": 0.1}}, **model)  # reverse
    bf16 = spec.sharding.precision == "bf16"
    episodes: list = []
    result, params, held = sharded_step(spec, 2, episodes=episodes)
    assert result.tasks == 3 and not result.nonfinite_slots
    # the model the objectives run through recomputes its blocks inside checkpointed_blocks(), not by its own flag
    assert [r["checkpointed_modules"] for r in held] == [int(spec.sharding.activation_checkpointing)] * 2
    if bf16:
        assert_within_bf16_bound(whole(result), spec, plain, params, 2, [0, 1, 2])
    else:
        assert_equal(whole(result), reference(plain, params, 2, [0, 1, 2]))
    # Evaluation: tasks dealt to the ranks (ZeRO-3: on the gathered whole tensors), scores put back in task order.
    alg = build_algorithm(plain.algorithm, build_model(spec.model, output_dim(spec.data)))
    dtype = torch.bfloat16 if bf16 else torch.float32
    tasks = build_task_source(spec.data, "train", spec.seed).batch(2, [0, 1, 2]).tasks()
    with torch.no_grad():
        outs = [alg.task_objective(as_dtype(params, dtype), t.to("cpu", dtype)) for t in tasks]
    expected = [{k: float(v) for k, v in out.metrics.items()} for out in outs]
    assert [sorted(e) for e in episodes] == [sorted(e) for e in expected]
    for got, want in zip(episodes, expected):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-6)
    if zero == 3:
        for r in held:
            assert r["whole_numel"] / 2 <= r["local_numel"] <= r["whole_numel"] / 2 + len(params)
            assert r["resident_numel"] == 0


@pytest.mark.parametrize("algorithm,zero", [("fomaml", 3), ("maml", 2), ("maml", 3)])
def test_a_non_finite_task_is_left_out_and_named(local_ray, drill, algorithm, zero):
    """Slot 1's query set is NaN (the nan drill): the group leaves it out of its sum and names it; the sum is the
    other two tasks' (second order: its rank back-propagated a blank in that round, adding exactly nothing)."""
    spec = job(algorithm={"name": algorithm, "inner": {"steps": 1, "lr": 0.1}}, sharding={"zero_stage": zero})
    result, params, _ = sharded_step(spec, 0, drill_slot=1, drill=drill)
    assert result.nonfinite_slots == [1] and result.tasks == 2
    assert_equal(whole(result), reference(spec, params, 0, [0, 2]))
    step = aggregate([result])
    assert step.nonfinite == [(1, 0)]  # what the coordinator's executor.nonfinite policy acts on


def test_a_rank_that_hangs_in_a_collective_is_found_by_the_timeout_and_its_item_recomputed(local_ray, drill):
    """Rank 1 stops (SIGSTOP) as meta-step 1 starts, so rank 0 waits in the step's first collective for ever; the
    call outlives its limit (cluster.timeout, from step 0's measured time), the group is ended and rebuilt, and the
    item is recomputed: the same result as without the fault."""
    fired = drill("hang:1:0:1")
    spec = job(cluster={"timeout": {"min_s": 2.0, "factor": 5.0}})
    coord = Coordinator(spec)
    pool = RayPool(spec)
    try:
        params = pool.put(coord.published())
        pool.run(items("meta_gradient", 0, 3, 1), params)  # measured: the limit of step 1's call comes from it
        [result] = pool.run(items("meta_gradient", 1, 3, 1), params)
        failures, generation = pool.failures, pool.workers[0].generation
    finally:
        pool.shutdown()
    assert fired.exists() and failures == 1 and generation == 2
    assert_equal(whole(result), reference(spec, coord.params, 1, [0, 1, 2]))
