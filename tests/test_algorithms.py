"""Meta-gradients checked against independent computations: finite differences, hand-written reference loops,
the per-task path (for vmap) and the un-checkpointed path (for checkpointing)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from metascale.algorithms import build_algorithm
from metascale.algorithms.executor import leaf_params, meta_gradient
from metascale.algorithms.protonet import prototype_logits
from metascale.config import (
    AlgorithmSpec,
    Conv4Spec,
    InnerLoopSpec,
    MLPSpec,
    ResNet12Spec,
    SinusoidData,
    SyntheticImagesData,
    ViTSpec,
)
from metascale.data import build_task_source
from metascale.data.tasks import TaskBatch
from metascale.models import build_model

ALL = ["maml", "fomaml", "reptile", "anil", "metasgd", "protonet"]


def _sinusoid(n=3):
    return build_task_source(SinusoidData(), "train", 0).batch(0, range(n)).to("cpu", torch.float64)


def _images(n=3, queries=3):
    spec = SyntheticImagesData(ways=5, shots=1, queries=queries, image_size=28)
    return build_task_source(spec, "train", 0).batch(0, range(n)).to("cpu", torch.float64)


@pytest.fixture
def recomputed(monkeypatch):
    """Counts what the checkpointing options actually checkpoint: inner steps (algorithms/inner.py) and the query
    pass (model blocks in models/checkpointing.py; ANIL's head in algorithms/anil.py), by wrapping the torch
    checkpoint each one calls."""
    import metascale.algorithms.anil as anil
    import metascale.algorithms.inner as inner
    import metascale.models.checkpointing as blocks

    counts = {"steps": 0, "query": 0}

    def counting(module, key, kind):
        real = module.__dict__[key]

        def wrapper(*args, **kwargs):
            counts[kind] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(module, key, wrapper)

    counting(inner, "recompute", "steps")
    counting(blocks, "checkpoint", "query")
    counting(anil, "recompute", "query")
    return counts


def _setup(name, model_spec, out, steps=1, lr=0.01, checkpoint="none", seed=0, **kw):
    torch.manual_seed(seed)
    model = build_model(model_spec, out).double()
    alg = build_algorithm(
        AlgorithmSpec(name=name, inner=InnerLoopSpec(steps=steps, lr=lr, checkpoint=checkpoint), **kw), model
    )
    return alg, alg.init(dict(model.named_parameters()))


def _summed_objective(alg, params, batch: TaskBatch) -> float:
    with torch.no_grad():  # values only: the adapted loss is the same with or without a meta-graph
        return sum(float(alg.task_objective(params, t).objective) for t in batch.tasks())


def _relative(a, b) -> float:
    """||a - b|| / ||a|| over all the tensors of two gradients."""
    num = sum(float(((a[k] - b[k]) ** 2).sum()) for k in a) ** 0.5
    return num / sum(float((a[k] ** 2).sum()) for k in a) ** 0.5


def _max_rel_error_vs_finite_differences(alg, meta, batch, coords=4, eps=1e-6):
    """||analytic - central FD|| / ||central FD|| over a spread of coordinates of every parameter tensor."""
    grads = meta_gradient(alg, meta, batch).grads
    fds, ans = [], []
    for name in meta:
        flat_idx = torch.linspace(0, meta[name].numel() - 1, coords).long().unique()
        for i in flat_idx.tolist():
            plus = {k: v.detach().clone() for k, v in meta.items()}
            minus = {k: v.detach().clone() for k, v in meta.items()}
            plus[name].view(-1)[i] += eps
            minus[name].view(-1)[i] -= eps
            fds.append((_summed_objective(alg, plus, batch) - _summed_objective(alg, minus, batch)) / (2 * eps))
            ans.append(float(grads[name].view(-1)[i]))
    fd, an = torch.tensor(fds), torch.tensor(ans)
    assert fd.norm() > 1e-3, "the check is only meaningful on a non-trivial gradient"
    return float((fd - an).norm() / fd.norm())


@pytest.mark.parametrize("steps", [1, 5])
def test_maml_meta_gradient_matches_central_finite_differences(float64, steps):
    alg, meta = _setup("maml", MLPSpec(hidden=[16, 16]), 1, steps=steps, lr=0.02)
    assert _max_rel_error_vs_finite_differences(alg, meta, _sinusoid()) < 1e-6


@pytest.mark.parametrize("name", ["metasgd", "anil"])
def test_other_second_order_meta_gradients_match_finite_differences(float64, name):
    alg, meta = _setup(name, MLPSpec(hidden=[8, 8]), 1, steps=2, lr=0.05)
    assert _max_rel_error_vs_finite_differences(alg, meta, _sinusoid(2)) < 1e-6


@pytest.mark.parametrize(  # Reptile's update has no vmap path; the labels as features once failed under vmap
    "name", [n for n in ALL if n != "reptile"] + ["learned_loss", "blackbox"]
)
def test_vmapped_path_equals_per_task_path_with_batch_norm(float64, name):
    alg, meta = _setup(name, Conv4Spec(hidden=8), 5, steps=5, lr=0.1)
    batch = _images()
    per_task = meta_gradient(alg, meta, batch, "per_task")
    vmapped = meta_gradient(alg, meta, batch, "vmap")
    assert (per_task.strategy, vmapped.strategy) == ("per_task", "vmap")  # vmap ran, no silent per-task fallback
    for k in meta:
        assert torch.allclose(per_task.grads[k], vmapped.grads[k], rtol=0, atol=1e-10), k
    assert per_task.tasks == vmapped.tasks == len(batch)
    assert abs(per_task.metrics["loss"] - vmapped.metrics["loss"]) < 1e-10


TINY_VIT = ViTSpec(dim=8, depth=1, heads=2)


@pytest.mark.parametrize("name", ["maml", "metasgd"])
@pytest.mark.parametrize(
    "model_spec", [TINY_VIT, ResNet12Spec(in_channels=1, channels=[4, 4])], ids=["vit", "resnet12"]
)
def test_vmapped_second_order_path_equals_per_task_on_the_large_backbones(float64, model_spec, name):
    """The ViT's layer norm once made vmap's second-order meta-gradient ~3e-3 off (models/norm.py, TaskLayerNorm)."""
    alg, meta = _setup(name, model_spec, 5, steps=2, lr=0.1)
    batch = _images(2)
    per_task = meta_gradient(alg, meta, batch, "per_task")
    vmapped = meta_gradient(alg, meta, batch, "vmap")
    assert (per_task.strategy, vmapped.strategy) == ("per_task", "vmap")
    assert _relative(per_task.grads, vmapped.grads) < 1e-8
    for k in meta:
        assert torch.allclose(per_task.grads[k], vmapped.grads[k], rtol=1e-8, atol=1e-12), k


def test_vmapped_vit_meta_gradient_matches_central_finite_differences(float64):
    """Along 4 random unit directions of all meta-parameters (one pair of evaluations each, so the whole ViT is
    covered cheaply). Step 1e-5: measured 4-8e-10 relative here (1e-4: 1e-7, truncation; 1e-6: 5e-10)."""
    alg, meta = _setup("maml", TINY_VIT, 5, steps=2, lr=0.1)
    batch = _images(2)
    grads = meta_gradient(alg, meta, batch, "vmap").grads
    gen, eps, fds, ans = torch.Generator().manual_seed(1), 1e-5, [], []
    for _ in range(4):
        d = {k: torch.randn(v.shape, generator=gen) for k, v in meta.items()}
        norm = sum(float((v**2).sum()) for v in d.values()) ** 0.5
        plus = {k: meta[k].detach() + eps * d[k] / norm for k in meta}
        minus = {k: meta[k].detach() - eps * d[k] / norm for k in meta}
        fds.append((_summed_objective(alg, plus, batch) - _summed_objective(alg, minus, batch)) / (2 * eps))
        ans.append(sum(float((grads[k] * d[k]).sum()) for k in meta) / norm)
    fd, an = torch.tensor(fds), torch.tensor(ans)
    assert fd.norm() > 1e-2
    assert float((fd - an).norm() / fd.norm()) < 1e-8


@pytest.mark.parametrize("name", ["maml", "anil", "metasgd", "learned_hparams"])
@pytest.mark.parametrize("mode", ["steps", "all"])
def test_checkpointed_inner_loop_equals_plain(float64, name, mode, recomputed):
    plain_alg, meta = _setup(name, Conv4Spec(hidden=8), 5, steps=4, lr=0.1)
    ck_alg, _ = _setup(name, Conv4Spec(hidden=8), 5, steps=4, lr=0.1, checkpoint=mode)
    batch = _images(2)
    a = meta_gradient(plain_alg, meta, batch).grads
    assert recomputed == {"steps": 0, "query": 0}
    b = meta_gradient(ck_alg, meta, batch).grads
    assert recomputed["steps"] == 2 * 4  # every inner step of both tasks was checkpointed
    assert (recomputed["query"] > 0) == (mode == "all")  # and with 'all', the query pass too
    for k in meta:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize(
    "model_spec", [ViTSpec(dim=16, depth=2, heads=2), ResNet12Spec(in_channels=1, channels=[4, 4])]
)
def test_blockwise_query_checkpointing_equals_plain(float64, model_spec, recomputed):
    """'all' recomputes the query pass block by block after functional_call has returned: the recomputation must
    use the adapted weights, not the module's own (which would give a different meta-gradient)."""
    plain_alg, meta = _setup("maml", model_spec, 5, steps=2, lr=0.1)
    ck_alg, _ = _setup("maml", model_spec, 5, steps=2, lr=0.1, checkpoint="all")
    batch = _images(2)
    a = meta_gradient(plain_alg, meta, batch).grads
    assert recomputed["query"] == 0
    b = meta_gradient(ck_alg, meta, batch).grads
    assert recomputed["query"] >= 2 * 2  # both tasks' query passes went block by block (2 blocks or stages)
    for k in meta:
        assert torch.equal(a[k], b[k]), k


def test_fomaml_equals_maml_with_detached_inner_gradients(float64):
    alg, meta = _setup("fomaml", MLPSpec(hidden=[16]), 1, steps=3, lr=0.05)
    batch = _sinusoid(2)
    ours = meta_gradient(alg, meta, batch).grads
    model = alg.f
    params = leaf_params(meta)
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    for t in batch.tasks():
        fast = dict(params)
        for _ in range(3):
            loss = F.mse_loss(model(fast, t.support_x), t.support_y)
            g = torch.autograd.grad(loss, list(fast.values()))
            fast = {k: p - 0.05 * gi.detach() for (k, p), gi in zip(fast.items(), g)}
        q = F.mse_loss(model(fast, t.query_x), t.query_y)
        for k, gi in zip(params, torch.autograd.grad(q, list(params.values()))):
            total[k] += gi
    for k in meta:
        assert torch.allclose(ours[k], total[k], atol=1e-12), k
    maml, _ = _setup("maml", MLPSpec(hidden=[16]), 1, steps=3, lr=0.05)
    second = meta_gradient(maml, meta, batch).grads
    assert any(not torch.allclose(second[k], ours[k], atol=1e-6) for k in meta), "first order must differ"


def test_reptile_update_equals_its_formula(float64):
    alg, meta = _setup("reptile", MLPSpec(hidden=[16]), 1, steps=4, lr=0.03)
    batch = _sinusoid(3)
    ours = meta_gradient(alg, meta, batch).grads
    expected = {k: torch.zeros_like(v) for k, v in meta.items()}
    for t in batch.tasks():
        fast = {k: v.detach().clone().requires_grad_() for k, v in meta.items()}
        for _ in range(4):
            loss = F.mse_loss(alg.f(fast, t.support_x), t.support_y)
            g = torch.autograd.grad(loss, list(fast.values()))
            fast = {k: (p - 0.03 * gi).detach().requires_grad_() for (k, p), gi in zip(fast.items(), g)}
        for k in meta:
            expected[k] += meta[k].detach() - fast[k].detach()  # theta - phi: outer SGD moves theta towards phi
    for k in meta:
        assert torch.allclose(ours[k], expected[k], atol=1e-12), k


def test_protonet_logits_are_negative_squared_distances_to_class_means(float64):
    torch.manual_seed(1)
    support, query = torch.randn(10, 7), torch.randn(6, 7)
    labels = torch.tensor([2, 0, 1, 2, 0, 1, 1, 0, 2, 2])
    logits = prototype_logits(support, labels, query, ways=3)
    for i in range(6):
        for c in range(3):
            mean = support[labels == c].mean(0)
            assert torch.allclose(logits[i, c], -((query[i] - mean) ** 2).sum(), atol=1e-12)


def test_metasgd_learning_rates_receive_gradients(float64):
    alg, meta = _setup("metasgd", MLPSpec(hidden=[16]), 1, steps=2, lr=0.05)
    grads = meta_gradient(alg, meta, _sinusoid(2)).grads
    lr_keys = [k for k in meta if k.startswith("lr.")]
    assert len(lr_keys) == len(alg.model_params(meta))
    for k in lr_keys:
        assert torch.isfinite(grads[k]).all() and grads[k].abs().sum() > 0, k


def test_anil_adapts_only_the_head(float64):
    alg, meta = _setup("anil", Conv4Spec(hidden=8), 5, steps=3, lr=0.5)
    task = _images(1)[0]
    seen = []
    original = alg.f.head

    def spy(params, features):
        seen.append(set(params))
        return original(params, features)

    alg.f.head = spy
    alg.task_objective(meta, task)
    assert seen and all(keys == {"head.weight", "head.bias"} for keys in seen)


def test_nonfinite_task_is_reported_by_slot_and_left_out(float64):
    alg, meta = _setup("maml", MLPSpec(hidden=[8]), 1)
    batch = _sinusoid(3)
    poisoned = TaskBatch(batch.support_x, batch.support_y, batch.query_x.clone(), batch.query_y)
    poisoned.query_x[1, 0, 0] = float("nan")
    for strategy in ("per_task", "vmap"):
        mg = meta_gradient(alg, meta, poisoned, strategy, slots=[10, 11, 12])
        assert mg.nonfinite_slots == [11] and mg.tasks == 2
        clean = meta_gradient(alg, meta, TaskBatch.stack([batch[0], batch[2]]))
        for k in meta:
            assert torch.allclose(mg.grads[k], clean.grads[k], atol=1e-12)


def test_bf16_autocast_runs_and_stays_close_to_float32():
    torch.manual_seed(0)
    model = build_model(Conv4Spec(hidden=8), 5)
    batch = _images(2).to("cpu", torch.float32)
    grads = {}
    for mode in ("none", "bf16"):
        alg = build_algorithm(AlgorithmSpec(name="maml", inner=InnerLoopSpec(steps=2, lr=0.1, autocast=mode)), model)
        grads[mode] = meta_gradient(alg, alg.init(dict(model.named_parameters())), batch).grads
    flat = {m: torch.cat([g.flatten() for g in gs.values()]) for m, gs in grads.items()}
    assert torch.isfinite(flat["bf16"]).all()
    assert not torch.equal(flat["bf16"], flat["none"]), "autocast must actually compute in bf16"
    # bf16 keeps 8 mantissa bits: a plain Conv-4 gradient under autocast is ~11% off float32 (norm), the meta-gradient
    # ~20%; the direction must still agree.
    cosine = torch.nn.functional.cosine_similarity(flat["bf16"], flat["none"], dim=0)
    assert cosine > 0.95, cosine
