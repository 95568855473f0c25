"""The black-box learner (a transformer over support and query tokens) and ABML (Bayesian, with calibrated
uncertainty): meta-gradients against finite differences (float64), the black-box prediction's invariance to the
support order, ECE against a hand computation, the one-line refusals, and short runs that learn."""

from __future__ import annotations

import pytest
import torch

from metascale.algorithms import build_algorithm
from metascale.algorithms.abml import LOG_STD, gaussian_kl
from metascale.algorithms.calibration import expected_calibration_error
from metascale.algorithms.executor import meta_gradient
from metascale.config import AlgorithmSpec, Conv4Spec, InnerLoopSpec, SyntheticImagesData
from metascale.config.sections import ABMLSpec, BlackBoxSpec
from metascale.data import build_task_source
from metascale.data.tasks import Task
from metascale.models import build_model

TINY = SyntheticImagesData(ways=3, shots=2, queries=2, image_size=28, classes=20)


def _setup(name, **kw):
    torch.manual_seed(0)
    model = build_model(Conv4Spec(hidden=4), TINY.ways).double()
    alg = build_algorithm(AlgorithmSpec(name=name, **kw), model)
    return alg, alg.init(dict(model.named_parameters()))


def _batch(tasks=2):
    return build_task_source(TINY, "train", 0).batch(0, range(tasks)).to("cpu", torch.float64)


def _directional_fd(alg, meta, batch, objective, eps, directions=3):
    """(autograd . v, central finite difference along v) for random directions v over all meta-parameters."""
    grads = meta_gradient(alg, meta, batch).grads
    g = torch.Generator().manual_seed(1)
    pairs = []
    for _ in range(directions):
        v = {k: torch.randn(t.shape, generator=g, dtype=t.dtype) for k, t in meta.items()}
        # Grad stays enabled: ABML draws `samples` weights in training, `eval_samples` under no_grad.
        plus = objective({k: t + eps * v[k] for k, t in meta.items()})
        minus = objective({k: t - eps * v[k] for k, t in meta.items()})
        pairs.append((sum(float((grads[k] * v[k]).sum()) for k in meta), (plus - minus) / (2 * eps)))
    return pairs


def test_blackbox_meta_gradient_matches_finite_differences(float64):
    alg, meta = _setup("blackbox", blackbox=BlackBoxSpec(dim=8, depth=2, heads=2))
    assert sum(1 for k in meta if k.startswith("blackbox.")) > 20  # the transformer is part of the meta-parameters
    batch = _batch()

    def objective(p):
        return sum(float(alg.task_objective(p, t).objective.detach()) for t in batch.tasks())

    for analytic, fd in _directional_fd(alg, meta, batch, objective, eps=1e-6):
        assert abs(fd) > 1e-3 and abs(analytic - fd) <= 1e-6 * abs(fd), (analytic, fd)
    grads = meta_gradient(alg, meta, batch).grads
    assert grads["blackbox.out_w"].abs().sum() > 0 and grads["body.0.weight"].abs().sum() > 0


def test_blackbox_prediction_is_invariant_to_the_support_order_and_uses_the_labels(float64):
    alg, meta = _setup("blackbox", blackbox=BlackBoxSpec(dim=8, depth=2, heads=2))
    task = _batch(1)[0]
    with torch.no_grad():
        base = alg.task_objective(meta, task).objective
        n = task.support_y.numel()
        perms = [torch.arange(n).flip(0)] + [
            torch.randperm(n, generator=torch.Generator().manual_seed(s)) for s in range(4)
        ]
        for perm in perms:
            shuffled = Task(task.support_x[perm], task.support_y[perm], task.query_x, task.query_y)
            assert torch.allclose(alg.task_objective(meta, shuffled).objective, base, rtol=1e-12, atol=1e-12)
        # Permuting the labels alone (images kept in place) must change the prediction: the labels are read.
        relabelled = Task(task.support_x, task.support_y.roll(1), task.query_x, task.query_y)
        assert not torch.allclose(alg.task_objective(meta, relabelled).objective, base)


def test_ece_equals_a_hand_computation():
    """Six predictions in three of the 15 bins ((m-1)/15, m/15], by hand: bin (0.400, 0.467] holds confidences
    0.45 (right) and 0.42 (wrong): |1/2 - 0.435| = 0.065; bin (0.800, 0.867] holds 0.85 (right): |1 - 0.85| = 0.15;
    bin (0.933, 1] holds 0.95 and 0.99 (right) and 0.97 (wrong): |2/3 - 0.97| = 0.30333.
    ECE = (2 x 0.065 + 1 x 0.15 + 3 x 0.30333) / 6 = 1.19 / 6."""
    probs = torch.tensor(
        [
            [0.45, 0.30, 0.25],
            [0.42, 0.33, 0.25],
            [0.85, 0.10, 0.05],
            [0.95, 0.03, 0.02],
            [0.99, 0.005, 0.005],
            [0.97, 0.02, 0.01],
        ],
        dtype=torch.float64,
    )
    y = torch.tensor([0, 1, 0, 0, 0, 2])
    assert float(expected_calibration_error(probs, y)) == pytest.approx(1.19 / 6, abs=1e-12)
    assert float(expected_calibration_error(torch.eye(3, dtype=torch.float64), torch.arange(3))) == 0.0
    assert float(expected_calibration_error(torch.eye(3, dtype=torch.float64), torch.tensor([1, 2, 0]))) == 1.0


def test_abml_kl_is_the_closed_form_and_zero_at_the_prior(float64):
    mu, log_std = {"w": torch.tensor([0.3, -1.0])}, {"w": torch.tensor([-1.0, 0.5])}
    p_mu, p_log_std = {"w": torch.tensor([0.0, 0.0])}, {"w": torch.tensor([0.0, 0.2])}
    q = torch.distributions.Normal(mu["w"], log_std["w"].exp())
    p = torch.distributions.Normal(p_mu["w"], p_log_std["w"].exp())
    expected = torch.distributions.kl_divergence(q, p).sum()
    assert torch.allclose(gaussian_kl(mu, log_std, p_mu, p_log_std), expected)
    assert float(gaussian_kl(mu, log_std, mu, log_std)) == 0.0


def test_abml_meta_gradient_matches_finite_differences(float64):
    """The Monte-Carlo draws are fixed by reseeding before each evaluation (common random numbers), so the sampled
    objective is a deterministic function of the prior's means and log standard deviations. eps is 1e-7: the sampled
    weights put ReLU kinks close enough that a 1e-6 step crossed one (FD off by 4e-4 relative; 1e-7 agrees to 1e-9)."""
    alg, meta = _setup(
        "abml",
        inner=InnerLoopSpec(steps=2, lr=0.3),
        abml=ABMLSpec(samples=2, init_log_std=-2.0, kl_weight=0.1, hyperprior=True),
    )
    assert set(meta) == {k for k in meta if not k.startswith(LOG_STD)} | {LOG_STD + k for k in alg.model_params(meta)}
    task = _batch(1)[0]
    batch = _batch(1)

    def objective(p):
        torch.manual_seed(7)
        return float(alg.task_objective(p, task).objective.detach())

    torch.manual_seed(7)
    for analytic, fd in _directional_fd(alg, meta, batch, objective, eps=1e-7):
        assert abs(fd) > 1e-3 and abs(analytic - fd) <= 1e-6 * abs(fd), (analytic, fd)


SMALL = {  # 3-way 1-shot synthetic images at 14 px, inline, no periodic evaluation: seconds, not minutes
    "model__image_size": 14,
    "data__image_size": 14,
    "data__queries": 5,
    "executor__dtype": "float32",
    "cluster__address": "inline",
    "eval__every": 0,
    "eval__final_episodes": 30,
    "checkpoint__every": 0,
    "outer__lr": 0.003,
}


def test_blackbox_learns_well_above_chance(tmp_path, make_job):
    from metascale.train import train

    out = train(make_job(tmp_path, algorithm__name="blackbox", outer__steps=40, outer__meta_batch=6, **SMALL))
    assert out["final/accuracy"] - out["final/accuracy_ci95"] > 0.45, out  # chance is 1/3
    assert 0.0 <= out["final/ece"] <= 1.0


def test_abml_learns_and_reports_ece_beside_accuracy(tmp_path, make_job):
    from metascale.train import train

    spec = make_job(
        tmp_path,
        algorithm__name="abml",
        algorithm__inner={"steps": 1, "lr": 0.4},
        algorithm__abml={"samples": 1, "eval_samples": 4},
        outer__steps=25,
        outer__meta_batch=4,
        **SMALL,
    )
    out = train(spec)
    assert out["final/accuracy"] - out["final/accuracy_ci95"] > 0.45, out  # chance is 1/3
    assert 0.0 <= out["final/ece"] <= 1.0 and out["final/ece_ci95"] > 0 and out["final/kl"] > 0


@pytest.mark.parametrize("name", ["blackbox", "abml"])
def test_classifier_only_learners_refuse_regression_data_in_one_line(name, tmp_path, cli):
    path = tmp_path / "job.yaml"
    path.write_text(f"name: x\nalgorithm: {{name: {name}}}\n")  # the default data: sinusoid regression
    code, out, err = cli("validate", str(path))
    assert code == 2 and out == ""
    problems = [line for line in err.strip().splitlines() if not line.startswith("error:")]
    assert len(problems) == 1 and f"algorithm '{name}' needs a classification data source, not sinusoid" in problems[0]


def test_blackbox_heads_must_divide_its_width():
    with pytest.raises(ValueError, match=r"blackbox.dim \(30\) must be a multiple of blackbox.heads \(4\)"):
        BlackBoxSpec(dim=30, heads=4)


@pytest.mark.parametrize("name", ["glyphs-blackbox", "glyphs-abml"])
def test_example_jobs_validate(name):
    from metascale.config import load_spec

    spec = load_spec(f"jobs/{name}.yaml")
    assert spec.name == name and spec.algorithm.name == name.removeprefix("glyphs-")


def test_abml_kl_weight_is_what_makes_it_under_confident(tmp_path, make_job):
    """The diagnosis of ABML's calibration (docs/survey-map.md, ABML): with the prior's standard deviation e^-5 the
    KL term penalises the inner step's size (kl_weight x (lr g)^2 / 2 sigma^2 per weight), so the meta-learner
    learns small adaptations and the posterior's predictions are under-confident. Same seeds and tasks: a tenth of
    the KL weight gives a lower held-out ECE and NLL."""
    from metascale.train import train

    out = {}
    for kl in (3e-5, 3e-6):
        spec = make_job(
            tmp_path / str(kl),
            algorithm__name="abml",
            algorithm__inner={"steps": 1, "lr": 0.4},
            algorithm__abml={"samples": 2, "eval_samples": 4, "kl_weight": kl},
            outer__steps=40,
            outer__meta_batch=4,
            eval__inner_steps=3,
            **{**SMALL, "eval__final_episodes": 60},
        )
        out[kl] = train(spec)
    assert out[3e-6]["final/ece"] < out[3e-5]["final/ece"] - 0.02, out
    assert out[3e-6]["final/loss"] < out[3e-5]["final/loss"], out


def test_abml_averaged_predictive_is_better_calibrated_than_maml_where_maml_is_over_confident(tmp_path, make_job):
    """Where the point-estimate learner is over-confident (noisy 1-shot images, 10 test-time adaptation steps that
    fit the one support image per class), ABML's predictive, the softmax averaged over weight draws from a posterior
    of standard deviation ~e^-3, has the lower ECE at no cost in accuracy; the same checkpoint predicting from one
    draw (no averaging over weights) loses the margin. Same seed, tasks and meta-steps for both learners; 5
    meta-steps, since on this task neither learner's held-out figures move in 200 (docs/survey-map.md, ABML)."""
    from metascale.evaluate import evaluate_checkpoint
    from metascale.train import train

    def job(name, **kw):
        return make_job(
            tmp_path / name,
            data__noise=2.0,
            data__classes=10,
            algorithm__inner={"steps": 1, "lr": 0.4},
            outer__steps=5,
            outer__meta_batch=4,
            eval__inner_steps=10,
            **{**SMALL, "eval__final_episodes": 60},
            **kw,
        )

    maml = train(job("maml"))
    abml_spec = {"samples": 2, "eval_samples": 10, "init_log_std": -3.0, "kl_weight": 1.64e-4}
    abml = train(job("abml", algorithm__name="abml", algorithm__abml=abml_spec))
    one_draw = job("abml", algorithm__name="abml", algorithm__abml={**abml_spec, "eval_samples": 1})
    single = evaluate_checkpoint(one_draw, None, 60)
    assert maml["final/confidence"] > maml["final/accuracy"] + 0.1, maml  # the regime: MAML over-confident
    assert abml["final/ece"] < maml["final/ece"] - 0.03, (abml, maml)
    assert abml["final/accuracy"] > maml["final/accuracy"] - 0.05, (abml, maml)  # not bought with accuracy
    assert single["test/ece"] > abml["final/ece"] + 0.02, (single, abml)
