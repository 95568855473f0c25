"""DARTS as a meta-representation: the network's mixed edges reduce to single ops at one-hot-large alpha, alpha's
meta-gradient (first and second order) matches finite differences (float64), a short run learns, `metascale export`
writes the derived cell, and meaningless combinations are refused with a reason."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from metascale.algorithms import build_algorithm
from metascale.algorithms.executor import meta_gradient
from metascale.cluster.coordinator import Coordinator
from metascale.cluster.estimators import backprop
from metascale.cluster.pool import InlinePool
from metascale.config import AlgorithmSpec, DartsSpec, InnerLoopSpec, SyntheticImagesData, load_spec, parse_spec
from metascale.data import build_task_source
from metascale.errors import SpecError
from metascale.evaluate import evaluate
from metascale.models import build_model
from metascale.train import train

ALL_OPS = ["none", "skip", "conv3", "conv5", "dil_conv3", "max_pool", "avg_pool"]
SMOOTH_OPS = ["none", "skip", "conv3", "avg_pool"]  # no max-pool kinks under finite differences


def _tiny(ops, first_order, steps=2):
    torch.manual_seed(0)
    model = build_model(DartsSpec(channels=3, cells=1, nodes=2, image_size=8, ops=ops), 2).double()
    alg = build_algorithm(
        AlgorithmSpec(name="darts", inner=InnerLoopSpec(steps=steps, lr=0.3, first_order=first_order)), model
    )
    meta = alg.init(dict(model.named_parameters()))
    g = torch.Generator().manual_seed(1)
    meta["alpha"] = torch.randn(meta["alpha"].shape, generator=g, dtype=torch.float64)  # away from uniform
    data = SyntheticImagesData(ways=2, shots=2, queries=2, image_size=8, classes=10)
    return alg, meta, build_task_source(data, "train", 0).batch(0, range(2)).to("cpu", torch.float64)


def _fd(objective, x: torch.Tensor, eps=1e-6) -> torch.Tensor:
    """Central finite differences of the scalar `objective(x)` over every coordinate of x."""
    out = torch.zeros_like(x)
    for i in range(x.numel()):
        plus, minus = x.clone(), x.clone()
        plus.view(-1)[i] += eps
        minus.view(-1)[i] -= eps
        out.view(-1)[i] = (objective(plus) - objective(minus)) / (2 * eps)
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert b.norm() > 1e-4, "the check is only meaningful on a non-trivial gradient"
    return float((a - b).norm() / b.norm())


def test_second_order_alpha_meta_gradient_matches_finite_differences_of_the_whole_objective(float64):
    alg, meta, batch = _tiny(SMOOTH_OPS, first_order=False)

    def objective(alpha):
        with torch.no_grad():
            return sum(float(alg.task_objective({**meta, "alpha": alpha}, t).objective) for t in batch.tasks())

    grads = meta_gradient(alg, meta, batch).grads
    assert _rel(grads["alpha"], _fd(objective, meta["alpha"])) < 1e-6


def test_first_order_meta_gradients_are_the_query_gradients_at_the_adapted_weights(float64):
    """First-order DARTS: alpha's meta-gradient is d Q(w', alpha) / d alpha with w' the support-adapted weights held
    fixed (finite differences of that), w's is the query gradient at w' (FOMAML); w' is computed here independently
    (plain gradient descent on the support loss through the model itself)."""
    alg, meta, batch = _tiny(SMOOTH_OPS, first_order=True)
    model, loss = alg.f.model, torch.nn.functional.cross_entropy
    call = torch.func.functional_call
    fd_alpha, fd_w = torch.zeros_like(meta["alpha"]), {}
    for task in batch.tasks():
        w = {k: v.detach() for k, v in meta.items() if k != "alpha"}
        for _ in range(2):
            w = {k: v.requires_grad_() for k, v in w.items()}
            g = torch.autograd.grad(
                loss(call(model, {**w, "alpha": meta["alpha"]}, (task.support_x,)), task.support_y), list(w.values())
            )
            w = {k: (v - 0.3 * gk).detach() for (k, v), gk in zip(w.items(), g)}

        def query(alpha, w=w, task=task):
            with torch.no_grad():
                return float(loss(call(model, {**w, "alpha": alpha}, (task.query_x,)), task.query_y))

        fd_alpha += _fd(query, meta["alpha"])
        w = {k: v.requires_grad_() for k, v in w.items()}
        q = loss(call(model, {**w, "alpha": meta["alpha"]}, (task.query_x,)), task.query_y)
        for k, gk in zip(w, torch.autograd.grad(q, list(w.values()))):
            fd_w[k] = fd_w.get(k, 0) + gk
    grads = meta_gradient(alg, meta, batch).grads
    assert _rel(grads["alpha"], fd_alpha) < 1e-6
    assert all(torch.allclose(grads[k], fd_w[k], rtol=1e-9, atol=1e-12) for k in fd_w)
    second, _, _ = _tiny(SMOOTH_OPS, first_order=False)
    exact = meta_gradient(second, meta, batch).grads["alpha"]
    assert _rel(grads["alpha"], exact) > 1e-3  # the approximation is a different direction, not a relabelling


def test_vmap_executor_gives_the_per_task_meta_gradient(float64):
    """Accelerators batch tasks with vmap (per-task batch norm written out there): same numbers as the loop."""
    alg, meta, batch = _tiny(ALL_OPS, first_order=False, steps=1)
    loop, vmapped = meta_gradient(alg, meta, batch), meta_gradient(alg, meta, batch, strategy="vmap")
    assert vmapped.strategy == "vmap"
    assert all(torch.allclose(vmapped.grads[k], g, rtol=1e-8, atol=1e-12) for k, g in loop.grads.items())


@pytest.mark.parametrize("op", ALL_OPS)
def test_one_hot_large_alpha_reduces_every_edge_to_its_op(op, float64):
    """alpha = 50 on one op (its softmax weight 1 - 6e-22) gives the network built from that op alone, composed here
    by hand from the cell's op modules: node0 = op(input), node1 = op(input) + op(node0), out = mean(nodes)."""
    torch.manual_seed(0)
    spec = DartsSpec(channels=4, cells=1, nodes=2, image_size=8, ops=ALL_OPS)
    model = build_model(spec, 3).double()
    k = ALL_OPS.index(op)
    with torch.no_grad():
        model.alpha.zero_()
        model.alpha[:, k] = 50.0
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    edges = [e.ops[k] for e in model.cells[0].edges]
    with torch.no_grad():
        h = model.stem(x)
        n0 = edges[0](h)
        n1 = edges[1](h) + edges[2](n0)
        expected = model.head(model.pool((n0 + n1) / 2).mean(dim=(2, 3)))
        out = model(x)
        uniform = (model.alpha.zero_(), model(x))[1]
    assert torch.allclose(out, expected, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(out, uniform, atol=1e-3)  # the property can fail: a mixture is not any single op
    if op == "none":
        assert torch.allclose(out, model.head.bias.expand_as(out))


def _darts_job(root, **kw):
    raw = {
        "name": "darts-t",
        "seed": 0,
        "model": {"name": "darts", "channels": 8, "cells": 2, "image_size": 14, "ops": SMOOTH_OPS},
        "data": {
            "source": "synthetic",
            "ways": 5,
            "shots": 1,
            "queries": 5,
            "classes": 40,
            "image_size": 14,
            "noise": 1.0,
        },
        "algorithm": {"name": "darts", "inner": {"steps": 1, "lr": 0.4, "first_order": True}},
        "outer": {"lr": 0.003, "meta_batch": 4, "steps": 25},
        "eval": {"every": 0, "episodes": 30, "final_episodes": 8},
        "checkpoint": {"dir": str(root / "ckpt"), "every": 0},
        "logging": {"wandb": {"mode": "disabled"}, "progress": False},
        "cluster": {"address": "inline"},
    }
    for key, value in kw.items():
        raw[key] = {**raw[key], **value}
    return parse_spec(raw)


def test_a_short_darts_run_learns_and_moves_alpha(tmp_path):
    """25 meta-steps on synthetic 5-way 1-shot tasks: held-out query accuracy rises well above chance (0.2) and
    above its start, and alpha leaves the uniform mixture. (Learned against fixed-uniform alpha needs longer: docs/survey-map.md.)"""
    spec = _darts_job(tmp_path)
    coord, pool = Coordinator(spec), InlinePool(spec)
    before = evaluate(pool, coord.published(), spec, spec.eval.episodes, "eval")["eval/accuracy"]
    for step in range(spec.outer.steps):
        coord.apply(backprop(spec, pool, step, coord.published()))
    after = evaluate(pool, coord.published(), spec, spec.eval.episodes, "eval")["eval/accuracy"]
    assert after > 0.35 and after > before + 0.05, (before, after)  # 750 query predictions: chance is 0.2 +- 0.015
    assert coord.params["alpha"].detach().std() > 1e-3


def test_learn_alpha_false_keeps_alpha_uniform_and_still_trains_the_weights(tmp_path):
    spec = _darts_job(tmp_path, algorithm={"darts": {"learn_alpha": False}}, outer={"steps": 3})
    coord, pool = Coordinator(spec), InlinePool(spec)
    start = {k: v.detach().clone() for k, v in coord.params.items()}
    for step in range(spec.outer.steps):
        coord.apply(backprop(spec, pool, step, coord.published()))
    assert torch.equal(coord.params["alpha"], start["alpha"])
    assert not torch.equal(coord.params["stem.0.weight"], start["stem.0.weight"])


def test_export_writes_the_derived_cell_as_json(tmp_path, cli):
    spec = _darts_job(tmp_path, outer={"steps": 4})
    train(spec)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    code, stdout, err = cli("export", str(path), "--to", str(tmp_path / "out" / "darts.safetensors"))
    assert code == 0, err
    line = json.loads(stdout.strip().splitlines()[-1])
    arch = json.loads((tmp_path / "out" / "darts.architecture.json").read_text())
    assert line["architecture"] == str(tmp_path / "out" / "darts.architecture.json")
    from metascale.cluster import checkpoint

    alpha = checkpoint.load_latest(spec.path(spec.checkpoint.dir))[1]["params"]["alpha"]
    ops = spec.model.ops
    assert [(e["from"], e["to"]) for e in arch["edges"]] == [("input", "node0"), ("input", "node1"), ("node0", "node1")]
    for e, row in zip(arch["edges"], alpha):
        best = max((i for i, o in enumerate(ops) if o != "none"), key=lambda i: float(row[i]))
        assert e["op"] == ops[best] != "none"
        assert sum(e["weights"].values()) == pytest.approx(1.0, abs=1e-5)
    assert line["cell"] == [f"{e['to']} <- {e['from']}: {e['op']}" for e in arch["edges"]]


@pytest.mark.parametrize(
    "patch, reason",
    [
        (
            {"algorithm": {"name": "darts"}, "model": {"name": "conv4"}, "data": {"source": "synthetic"}},
            "needs model.name 'darts'",
        ),
        (
            {
                "algorithm": {"name": "darts", "inner": {"steps": 0}},
                "model": {"name": "darts"},
                "data": {"source": "synthetic"},
            },
            "support split is never read",
        ),
        (
            {
                "algorithm": {"name": "darts", "darts": {"learn_alpha": False}},
                "model": {"name": "darts"},
                "data": {"source": "synthetic"},
                "outer": {"estimator": "es"},
            },
            "perturbs every meta-parameter",
        ),
        ({"model": {"name": "darts", "ops": ["none"]}, "data": {"source": "synthetic"}}, "needs an op besides 'none'"),
        ({"model": {"name": "darts", "ops": ["skip", "skip"]}, "data": {"source": "synthetic"}}, "lists an op twice"),
        ({"model": {"name": "darts", "ops": ["conv7"]}, "data": {"source": "synthetic"}}, "model.ops.0"),
        ({"model": {"name": "darts", "image_size": 4, "cells": 3}, "data": {"source": "synthetic"}}, "too small"),
        ({"model": {"name": "darts"}}, "needs model.name 'mlp'"),
    ],
)
def test_meaningless_darts_combinations_are_refused_with_a_reason(patch, reason):
    with pytest.raises(SpecError, match=reason):
        parse_spec(patch)


def test_the_darts_job_validates():
    spec = load_spec("jobs/glyphs-darts.yaml")
    assert spec.algorithm.name == "darts" and spec.model.name == "darts" and spec.algorithm.inner.first_order
