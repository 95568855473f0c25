"""MLDG on the spurious-feature task (data/spurious.py): the source draws the stated mechanism, meaningless specs are
refused, `bench dg` runs on it, and MLDG beats pooled ERM on the held-out domain where ERM is fooled."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from metascale.config import SpuriousData, load_spec, parse_spec
from metascale.data.spurious import SpuriousTasks
from metascale.errors import SpecError

JOB = "jobs/spurious-mldg.yaml"


def _slope(x: np.ndarray, y: np.ndarray) -> float:
    """The feature's mean times the label's sign, s = 2y - 1: the domain's mean for y = 1."""
    return float((x * (2.0 * y - 1.0)).mean())


def test_spurious_source_draws_the_invariant_and_the_per_domain_spurious_feature():
    spec = SpuriousData(domains=[1.0, 0.5, -1.0], target=-0.25, per_domain=3000, test_per_domain=3000, batch=8)
    train = SpuriousTasks(spec, "train", 0)
    for (x, y), a in zip(train.train, spec.domains):
        assert abs(_slope(x[:, 0], y) - 1.0) < 0.08  # the same mechanism in every domain
        assert abs(_slope(x[:, 1], y) - a) < 0.01  # the domain's own spurious mean, sign included
        assert abs(float((x[:, 1] - a * (2 * y - 1)).std()) - spec.spurious_noise) < 0.01
    test = SpuriousTasks(spec, "test", 0)
    assert abs(_slope(test.eval_x[:, 1], test.eval_y) - spec.target) < 0.01  # the test split reads the target only
    val = SpuriousTasks(spec, "val", 0)
    assert len(val.eval_y) == 3 * 3000 and abs(_slope(val.eval_x[:, 1], val.eval_y) - 0.5 / 3) < 0.01
    seen = {tuple(r) for x, _ in train.train for r in x.tolist()}
    assert not any(tuple(r) in seen for r in val.eval_x.tolist())  # held out: no training example among them
    task = train.task(5, 2)
    assert task.support_x.shape == (16, 2) and task.query_x.shape == (8, 2)
    pools = [x for x, _ in train.train]
    which = lambda rows: {i for r in rows for i, p in enumerate(pools) if (p == r).all(1).any()}  # noqa: E731
    support, query = which(task.support_x.numpy()), which(task.query_x.numpy())
    assert len(support) == 2 and len(query) == 1 and not support & query  # a split of the three sources
    assert (train.task(5, 2).support_x == task.support_x).all()  # a pure function of (seed, step, slot)


@pytest.mark.parametrize(
    "patch, reason",
    [
        ({"model": {"name": "conv4"}}, "needs model.name 'mlp' with in_features 2"),
        ({"model": {"name": "mlp", "in_features": 3}}, "needs model.name 'mlp' with in_features 2"),
        ({"data": {"source": "spurious", "domains": [1.0]}}, "cannot be split"),
        ({"data": {"source": "spurious", "batch": 500}}, "exceeds a domain's training examples"),
        ({"algorithm": {"name": "maml"}}, "need data.source 'domains' or 'spurious'"),
    ],
)
def test_meaningless_spurious_specs_are_refused_with_a_reason(patch, reason):
    base = {"model": {"name": "mlp", "in_features": 2}, "data": {"source": "spurious"}, "algorithm": {"name": "mldg"}}
    with pytest.raises(SpecError, match=reason):
        parse_spec({**base, **patch})


def test_bench_dg_runs_on_the_spurious_job(cli):
    code, stdout, _ = cli("bench", "dg", JOB, "--seeds", "0", "--set", "outer.steps=2")  # target: the job's, -1.0
    assert code == 0, stdout
    result = json.loads(stdout.strip().splitlines()[-1])
    assert {(r["method"], r["target"]) for r in result["runs"]} == {("mldg", "-1.0"), ("erm_pooled", "-1.0")}
    assert all(r["test_episodes"] == 5 and r["val_episodes"] == 3 * 1000 // 200 for r in result["runs"])
    assert result["paired_difference"]["average_over_targets"]["n"] == 1


def _train(method: str, seed: int, tmp_path) -> tuple[float, float | None]:
    """(target test accuracy, ERM's accuracy on the sources' held-out examples) of the shipped job's model, trained by
    the real loop; alpha 2 (the job ships the sources' val choice, 0.5, under which the gain is smaller:
    docs/survey-map.md)."""
    from metascale.evaluate import evaluate_checkpoint
    from metascale.train import train

    sets = [f"algorithm.name={method}", f"seed={seed}", f"checkpoint.dir={tmp_path}/{method}-{seed}",
            "checkpoint.every=0", "logging.wandb.mode=disabled", "algorithm.inner.lr=2.0"]  # fmt: skip
    test = train(load_spec(JOB, sets))["final/accuracy"]
    if method != "erm_pooled":
        return test, None
    return test, evaluate_checkpoint(load_spec(JOB, [*sets, "eval.split=val"]), None, 15)["val/accuracy"]


def test_mldg_beats_pooled_erm_on_the_flipped_target_where_erm_is_fooled(tmp_path):
    """Seeds 0-2, 300 steps of a 16-unit MLP. The invariant feature alone gives Phi(1/1.5) = 74.8% in every domain:
    ERM learns the sources (held-out source accuracy above that) but falls well below it on the target, where the
    spurious feature's sign flips; MLDG, rewarded for gradients that agree across sources, is ahead on every seed."""
    invariant_only = 0.5 * (1 + math.erf(1 / 1.5 / math.sqrt(2)))
    seeds = (0, 1, 2)
    runs = {(m, s): _train(m, s, tmp_path) for m in ("erm_pooled", "mldg") for s in seeds}
    for s in seeds:
        erm_test, erm_val = runs[("erm_pooled", s)]
        assert erm_val > invariant_only and erm_test < invariant_only - 0.1, runs  # fooled, not failing to learn
    gains = [runs[("mldg", s)][0] - runs[("erm_pooled", s)][0] for s in seeds]
    assert min(gains) > 0 and sum(gains) / len(gains) > 0.02, runs


def test_mldg_objective_is_the_losses_minus_alpha_beta_times_the_gradient_alignment_to_first_order():
    """The mechanism the task relies on (data/spurious.py): MLDG's objective equals L_tr + beta L_te - alpha beta
    grad L_tr . grad L_te up to O(alpha^2), checked on a spurious-task step (float64, a tiny MLP): the remainder
    shrinks fourfold when alpha halves, and the alignment term is not negligible against it."""
    import torch

    from metascale.algorithms import build_algorithm
    from metascale.algorithms.mldg import mldg_objective
    from metascale.config import AlgorithmSpec, MLPSpec
    from metascale.models import build_model

    torch.manual_seed(0)
    model = build_model(MLPSpec(in_features=2, hidden=[5]), 2).double()
    alg = build_algorithm(AlgorithmSpec(name="mldg"), model)
    theta = {k: v.detach().clone().requires_grad_(True) for k, v in alg.init(dict(model.named_parameters())).items()}
    task = SpuriousTasks(SpuriousData(per_domain=64, test_per_domain=8), "train", 0).task(0, 0).to("cpu", torch.float64)

    def grad(x, y):
        return torch.autograd.grad(torch.nn.functional.cross_entropy(alg.f(theta, x), y), list(theta.values()))

    g_tr, g_te = grad(task.support_x, task.support_y), grad(task.query_x, task.query_y)
    losses = {k: float(torch.nn.functional.cross_entropy(alg.f(theta, x), y).detach()) for k, x, y in
              [("tr", task.support_x, task.support_y), ("te", task.query_x, task.query_y)]}  # fmt: skip
    align = sum(float((a * b).sum()) for a, b in zip(g_tr, g_te))
    beta = 0.7

    def remainder(alpha):
        got = float(mldg_objective(alg.f, theta, task, alpha, beta, False)[0].detach())
        return got - (losses["tr"] + beta * losses["te"] - alpha * beta * align)

    r1, r2 = remainder(0.02), remainder(0.01)
    assert abs(0.01 * beta * align) > 10 * abs(r2)  # the first-order term dominates the remainder
    assert 3.5 < r1 / r2 < 4.5  # O(alpha^2)
