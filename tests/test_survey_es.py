"""Evolution strategies: the estimate is unbiased on a quadratic, shaping keeps its direction, and on real Ray the
workers send only scalars, a lost worker's pairs are re-run bit for bit, and the result equals the in-driver one."""

from __future__ import annotations

import pickle

import ray
import torch

from metascale.algorithms import es
from metascale.cluster.coordinator import Coordinator
from metascale.cluster.estimators import es as es_estimator
from metascale.cluster.estimators import items
from metascale.cluster.pool import InlinePool, RayPool
from metascale.config import parse_spec


def _quadratic(d=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(d, d, generator=g, dtype=torch.float64)
    a = m @ m.T / d + torch.eye(d, dtype=torch.float64)  # positive definite
    b = torch.randn(d, generator=g, dtype=torch.float64)
    theta = {"w": torch.randn(d, generator=g, dtype=torch.float64)}

    def f(p):
        return float(0.5 * p["w"] @ a @ p["w"] + b @ p["w"])

    return f, theta, a @ theta["w"] + b


def _scores(f, theta, step, pairs, sigma):
    plus, minus = [], []
    for i in pairs:
        eps = es.noise(theta, 0, step, i)
        plus.append(f(es.perturb(theta, eps, sigma)))
        minus.append(f(es.perturb(theta, eps, -sigma)))
    return plus, minus


def test_mean_of_raw_fitness_estimates_matches_the_true_gradient_of_a_quadratic():
    """Tolerance: every coordinate within 4 standard errors (var of eps_j * eps.g is |g|^2 + g_j^2 per pair), and
    the whole vector within 6% relative error (expected ~3.3%), over 10 draws of 1000 pairs."""
    f, theta, true = _quadratic()
    sigma, draws, n = 0.5, 10, 1000
    estimates = []
    for step in range(draws):
        pairs = range(n)
        plus, minus = _scores(f, theta, step, pairs, sigma)
        estimates.append(es.estimate(theta, 0, step, pairs, plus, minus, sigma, shaping="none")["w"])
    mean = torch.stack(estimates).mean(0)
    se = ((true.norm() ** 2 + true**2) / (draws * n)).sqrt()
    assert ((mean - true).abs() <= 4 * se).all(), (mean - true) / se
    assert (mean - true).norm() / true.norm() < 0.06


def test_centred_rank_shaping_keeps_the_descent_direction():
    f, theta, true = _quadratic(seed=1)
    pairs = range(500)
    plus, minus = _scores(f, theta, 0, pairs, 0.1)
    shaped = es.estimate(theta, 0, 0, pairs, plus, minus, 0.1, shaping="centred_rank")["w"]
    assert torch.nn.functional.cosine_similarity(shaped, true, dim=0) > 0.9
    ranks = es.centred_ranks(torch.tensor([[3.0, -1.0], [10.0, 0.5]]))
    assert torch.allclose(ranks, torch.tensor([[1 / 6, -0.5], [0.5, -1 / 6]], dtype=torch.float64), atol=1e-15)


def test_noise_is_a_pure_function_of_seed_step_and_pair():
    theta = {"a": torch.zeros(3, 4), "b": torch.zeros(5)}
    one, again = es.noise(theta, 7, 3, 2), es.noise(theta, 7, 3, 2)
    other = es.noise(theta, 7, 3, 3)
    assert all(torch.equal(one[k], again[k]) for k in theta)
    assert not torch.equal(one["a"], other["a"]) and one["a"].dtype == torch.float32


def _spec(workers, tmp_path):
    return parse_spec(
        {
            "name": "es",
            "data": {"source": "sinusoid"},
            "algorithm": {"name": "maml", "inner": {"steps": 1, "lr": 0.01}},
            "outer": {"estimator": "es", "meta_batch": 6, "es": {"tasks": 2, "sigma": 0.05}},
            "checkpoint": {"dir": str(tmp_path)},
            "executor": {"dtype": "float64"},
            "cluster": {"workers": workers},
        }
    )


def test_ray_es_step_sends_scalars_survives_a_lost_worker_and_equals_inline(local_ray, tmp_path):
    spec = _spec(2, tmp_path)
    coord = Coordinator(spec)
    inline_spec = _spec(1, tmp_path)
    expected = es_estimator(inline_spec, InlinePool(inline_spec), 4, coord.published())
    pool = RayPool(spec)
    try:
        ref = pool.put(coord.published())
        sent = pool.run(items("fitness", 4, spec.outer.meta_batch, 2), ref)
        assert max(len(pickle.dumps(r)) for r in sent) < 1024  # scalars only (the model has 1,761 parameters)
        ray.kill(pool.workers[1].actor, no_restart=False)  # its pairs must be re-run on the other worker
        got = es_estimator(spec, pool, 4, ref)
        assert pool.failures >= 1
    finally:
        pool.shutdown()
    assert got.tasks == expected.tasks == 2 * 6 * 2
    for k, g in expected.grads.items():
        assert torch.equal(got.grads[k], g), k
    assert got.metrics == expected.metrics
