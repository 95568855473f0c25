"""Learned optimisers meta-trained by truncated unrolls (algorithms/lopt.py, algorithms/pes.py, cluster/unrolled.py):
PES is unbiased for the full-unroll gradient where truncated backprop and plain truncated ES are not; a particle
replayed from the published history equals the one a worker kept; a killed Ray worker and a resumed run change
nothing in the final meta-parameters."""

from __future__ import annotations

import pytest
import torch

from metascale.algorithms import pes
from metascale.cluster import checkpoint
from metascale.cluster.coordinator import Coordinator
from metascale.cluster.estimators import pick
from metascale.cluster.pool import InlinePool, RayPool
from metascale.config import parse_spec
from metascale.errors import SpecError
from metascale.train import train


class LinearDynamics:
    """x <- A x + B theta, loss 0.5 |x - c|^2 after each step: x is linear in theta, so every truncation's loss and
    the full-unroll objective are quadratics in theta, and Gaussian smoothing leaves their gradient unchanged."""

    def __init__(self, d: int = 4, p: int = 3):
        g = torch.Generator().manual_seed(0)
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        self.a = 0.9 * q  # a slow rotation: the state remembers theta across truncations
        self.b = torch.randn(d, p, generator=g, dtype=torch.float64)
        self.c = torch.randn(d, generator=g, dtype=torch.float64)

    def fresh(self, key, task):
        """x0 by (particle, unroll) alone: every seed's particle i starts where the full-unroll reference does."""
        return torch.randn(4, generator=torch.Generator().manual_seed(1000 * key[1] + key[2]), dtype=torch.float64)

    def train_steps(self, theta, x, task, steps):
        total = torch.zeros((), dtype=torch.float64)
        for _ in range(steps):
            x = self.a @ x + self.b @ theta["w"]
            total = total + 0.5 * (x - self.c).square().sum()
        return x, total / steps


def _full_unroll_gradient(problem, theta, particles, truncations, length):
    """Autograd through the whole inner run: the gradient of the sum of its truncation losses, mean over particles."""
    w = theta["w"].clone().requires_grad_(True)
    total = 0.0
    for i in range(particles):
        x = problem.fresh((0, i, 0), None)
        for _ in range(truncations):
            x, loss = problem.train_steps({"w": w}, x, None, length)
            total = total + loss
    return torch.autograd.grad(total / particles, w)[0]


def test_pes_is_unbiased_for_the_full_unroll_gradient_where_truncated_methods_are_not():
    """Over 200 seeds of 4 pairs, each seed's PES estimates summed over the W truncations of one inner run (theta
    fixed) match autograd through the full unroll within 3 standard errors per coordinate; truncated ES (the noise
    of the current truncation only) and truncated backprop, from the same runs, miss it by far more."""
    problem, theta = LinearDynamics(), {"w": torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64)}
    truncations, length, pairs, sigma = 4, 3, 4, 0.1
    true = _full_unroll_gradient(problem, theta, pairs, truncations, length)
    sums, truncated = [], []
    for seed in range(200):
        sched = pes.Schedule(seed, truncations, length, sigma, stagger=False)
        workers = pes.Particles(problem, sched, "pes")
        total, short = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
        for step in range(truncations):
            rows = [(i, *workers.advance(i, step, lambda s: theta, lambda u: None)) for i in range(pairs)]
            total += pes.estimate(theta, seed, step, rows, sigma, truncations, False)["w"]
            short += pes.estimate(theta, seed, step, rows, sigma, 1, False)["w"]  # xi = this truncation's noise
        sums.append(total)
        truncated.append(short)
    est = torch.stack(sums)
    se = est.std(0) / len(sums) ** 0.5
    assert ((est.mean(0) - true).abs() <= 3 * se).all(), ((est.mean(0) - true) / se, true)
    assert ((torch.stack(truncated).mean(0) - true).abs() / se).min() > 5  # measured: 9.3-10

    tbptt = pes.Particles(problem, pes.Schedule(0, truncations, length, sigma, False), "tbptt")
    grad = sum(
        sum(tbptt.advance(i, step, lambda s: theta, lambda u: None)[1]["w"] for i in range(pairs)) / pairs
        for step in range(truncations)
    )
    assert ((grad - true).abs() / se).min() > 5  # measured: 9.2-9.5


def test_a_replayed_particle_equals_the_one_a_worker_kept():
    """A worker without the particle (restarted, or another one) replays it from its last reset: same bits, for
    staggered resets crossing a reset too, and under changing meta-parameters."""
    problem, sched = LinearDynamics(), pes.Schedule(3, 3, 2, 0.1, stagger=True)
    thetas = {s: {"w": torch.tensor([0.1 * s, -0.2, 0.05 * s], dtype=torch.float64)} for s in range(8)}
    kept = pes.Particles(problem, sched, "pes")
    for step in range(8):
        for particle in range(3):
            held = kept.advance(particle, step, thetas.__getitem__, lambda u: None)
            fresh = pes.Particles(problem, sched, "pes")
            assert fresh.advance(particle, step, thetas.__getitem__, lambda u: None) == held
            assert fresh.replayed == step - pes.last_reset(step, particle, 3, True)
    assert kept.replayed == 0
    assert [pes.last_reset(s, 1, 3, True) for s in range(7)] == [0, 0, 2, 2, 2, 5, 5]


def _spec(tmp_path, estimator="pes", **outer):
    return parse_spec(
        {
            "name": f"lopt-{estimator}",
            "model": {"name": "mlp", "in_features": 64, "hidden": [8]},
            "data": {"source": "synthetic", "image_size": 8, "ways": 3, "shots": 4, "queries": 4},
            "algorithm": {"name": "lopt", "inner": {"steps": 6}, "lopt": {"hidden": 8}},
            "outer": {
                "estimator": estimator,
                "meta_batch": 4,
                "steps": 5,
                "lr": 0.01,
                "pes": {"truncation": 2, "sigma": 0.05},
                **outer,
            },
            "eval": {"every": 0, "final_episodes": 4},
            "checkpoint": {"dir": str(tmp_path / "ckpt"), "every": 2},
            "logging": {"wandb": {"mode": "disabled"}},
            "executor": {"dtype": "float64"},
            "cluster": {"workers": 2},
        }
    )


def _steps(spec, pool, steps):
    coord = Coordinator(spec)
    estimate = pick(spec, coord)
    for _ in range(steps):
        coord.published()
        assert coord.apply(estimate(pool, coord.step, None))
    return coord


def test_a_killed_ray_worker_changes_nothing_in_the_final_meta_parameters(local_ray, tmp_path, drill):
    """Worker 1 exits as it starts step 2's truncations; Ray restarts it empty, its particles are replayed (on it or
    the other worker) from the history, and the meta-parameters after 5 steps equal the in-driver run's bit for bit."""
    spec = _spec(tmp_path)
    inline = _steps(spec, InlinePool(spec), 5)
    fired = drill("exit:2:1")
    pool = RayPool(spec)
    try:
        coord = _steps(spec, pool, 5)
        assert pool.failures >= 1 and fired.exists()
    finally:
        pool.shutdown()
    for k, v in inline.params.items():
        assert torch.equal(coord.params[k], v), k
    assert any(not torch.equal(v, Coordinator(spec).params[k]) for k, v in inline.params.items())  # it trained


def test_tbptt_and_pes_resume_exactly_from_a_checkpoint(tmp_path):
    """A run stopped at step 3 and resumed ends where an uninterrupted 5-step run ends: the particles are replayed
    from the history saved in the checkpoint (a fresh pool holds none)."""
    for estimator in ("pes", "tbptt"):
        base = tmp_path / estimator
        whole = _spec(base / "whole", estimator, steps=5)
        whole = whole.model_copy(update={"cluster": whole.cluster.model_copy(update={"address": "inline"})})
        train(whole)
        part = whole.model_copy(
            update={
                "checkpoint": whole.checkpoint.model_copy(update={"dir": str(base / "part")}),
                "outer": whole.outer.model_copy(update={"steps": 3}),
            }
        )
        train(part)
        resumed = part.model_copy(update={"outer": whole.outer})
        assert train(resumed, resume=True)["step"] == 5
        want = checkpoint.load_latest(str(base / "whole" / "ckpt"))[1]
        got = checkpoint.load_latest(str(base / "part"))[1]
        assert sorted(got["history"]) == ["2", "3", "4"]  # W = 3: what step 5's particles may need, but step 5
        for k, v in want["params"].items():
            assert torch.equal(got["params"][k], v), (estimator, k)


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"algorithm": {"name": "maml"}, "model": {"name": "conv4", "hidden": 8}}, "needs algorithm.name 'lopt'"),
        ({"outer": {"estimator": "pes", "pes": {"truncation": 4}}}, "must divide algorithm.inner.steps"),
        ({"model": {"name": "mlp", "in_features": 63}}, "model.in_features must be 64"),
        ({"model": {"name": "conv4"}}, "algorithm 'lopt' trains an MLP"),
    ],
)
def test_specs_that_cannot_unroll_are_refused_in_one_line(tmp_path, change, needle):
    raw = _spec(tmp_path).model_dump(mode="json")
    for section, fields in change.items():
        raw[section] = fields if section == "model" else {**raw[section], **fields}
    with pytest.raises(SpecError) as e:
        parse_spec(raw)
    assert needle in str(e.value), str(e.value)


def test_a_pes_meta_trained_optimiser_trains_held_out_tasks_faster_than_tuned_adam(tmp_path):
    """40 PES steps (8 pairs, the 6-step horizon of the comparison) and the learned optimiser's mean training loss
    over 6 steps on held-out episodes (test split, unseen initialisations) is below Adam's with the grid's best lr
    (picked on validation episodes), where at its initialisation it barely trains at all."""
    from metascale.bench import lopt as bench

    spec = _spec(tmp_path, "pes", lr=0.03, meta_batch=8)
    spec = spec.model_copy(
        update={
            "algorithm": spec.algorithm.model_copy(
                update={"lopt": spec.algorithm.lopt.model_copy(update={"step_mult": 0.1})}
            )
        }
    )
    lrs = (0.003, 0.01, 0.03, 0.1, 0.3)
    coord = _steps(spec, InlinePool(spec), 40)
    before = bench.run(spec, Coordinator(spec).params, episodes=8, lrs=lrs)
    after = bench.run(spec, {k: v.detach() for k, v in coord.params.items()}, episodes=8, lrs=lrs)
    assert before["adam_lr"] == after["adam_lr"] in lrs[1:-1]  # an interior optimum: the grid brackets it
    assert after["adam_mean_train_loss"] == before["adam_mean_train_loss"]  # the same tasks and initialisations
    assert before["lopt_mean_train_loss"] > 5 * after["adam_mean_train_loss"]  # measured 1.17 vs 0.111
    assert after["lopt_mean_train_loss"] < 0.95 * after["adam_mean_train_loss"], (before, after)  # measured 0.092


def test_bench_lopt_scores_the_checkpoint_it_is_given(tmp_path, cli):
    """`bench lopt --checkpoint` scores that step folder (an earlier step of a run still going), the default the
    newest; a missing one is a one-line error, exit 2."""
    import json

    import yaml

    spec = _spec(tmp_path, "pes", steps=4)
    spec = spec.model_copy(update={"cluster": spec.cluster.model_copy(update={"address": "inline"})})
    train(spec)
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(spec.model_dump(mode="json", exclude={"path"}, exclude_unset=False)))
    ckpt = tmp_path / "ckpt"
    for extra, step in (([], 4), (["--checkpoint", str(ckpt / "step-00000002")], 2)):
        code, out, err = cli("bench", "lopt", str(job), "--episodes", "1", *extra)
        assert code == 0, err
        assert json.loads(out.strip().splitlines()[-1])["checkpoint_step"] == step
    code, out, err = cli("bench", "lopt", str(job), "--checkpoint", str(ckpt / "step-00000099"))
    assert code == 2 and "no such checkpoint" in err and len(err.strip().splitlines()) == 1, err
