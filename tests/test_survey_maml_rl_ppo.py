"""MAML-RL's PPO epochs (`algorithm.maml_rl.epochs`): each later round of a meta-step regenerates the step's rollouts
from theta_old, re-adapts the current meta-parameters on them and scores the clipped outer surrogate against the
log-probs of theta_old's adapted policy; checked against a plain-torch re-implementation, for clipping, for exact
regeneration (also after a worker lost in the first epoch or a later one, and under all-reduce aggregation) and for
the step's atomicity."""

from __future__ import annotations

import logging
import math

import pytest
import ray
import torch

from metascale.algorithms import build_algorithm
from metascale.algorithms.executor import meta_gradient
from metascale.algorithms.maml_rl import generator, rollout
from metascale.cluster.allreduce import AllReduce
from metascale.cluster.coordinator import Coordinator
from metascale.cluster.estimators import pick
from metascale.cluster.pool import InlinePool, RemoteReplica
from metascale.config import AlgorithmSpec, InnerLoopSpec, MAMLRLSpec, MLPSpec, NavigationData, parse_spec
from metascale.data.navigation import NavigationTasks
from metascale.data.tasks import TaskBatch
from metascale.errors import SpecError
from metascale.models import build_model
from metascale.train import train


def _tasks(data: NavigationData, n: int = 3) -> TaskBatch:
    t = NavigationTasks(data, "train", 2).batch(0, range(n))
    return TaskBatch(t.support_x.double(), t.support_y, t.query_x.double(), t.query_y)


def _reference(theta_old: dict, theta: dict, data: NavigationData, tasks: TaskBatch, lr: float, eps: float):
    """Sum over tasks of d/dtheta of -mean min(r A, clip(r, 1-eps, 1+eps) A), r = pi_theta'(a|s) / pi_old'(a|s) on
    the post-update rollouts of old' (theta_old after one REINFORCE step on its pre-update rollouts), theta' = theta
    after the plain REINFORCE step on the same pre-update rollouts; gamma 1, no baseline (A = return-to-go). Also the
    fraction of clipped ratios."""

    def logp(w, b, s, ro):
        z = (ro.actions - ro.obs @ w.T - b) / s.exp()
        return (-0.5 * z**2 - s - 0.5 * math.log(2 * math.pi)).sum(-1)

    def adapt(p, ro, graph):
        adv = ro.rewards.flip(1).cumsum(1).flip(1)
        g = torch.autograd.grad((logp(*p, ro) * adv).mean(), p, create_graph=graph)
        return [x + lr * gx for x, gx in zip(p, g)]

    leaves = [v.clone().requires_grad_(True) for v in theta.values()]
    total, clipped, count = torch.zeros(8, dtype=torch.float64), 0, 0
    for task in tasks.tasks():
        goal = task.support_x[0]
        w0, b0, s0 = (v.clone().requires_grad_(True) for v in theta_old.values())
        pre = rollout(lambda x: x @ w0.T + b0, s0, goal, data, generator(task.support_y[0], 0))
        w1, b1, s1 = (x.detach() for x in adapt([w0, b0, s0], pre, False))
        post = rollout(lambda x: x @ w1.T + b1, s1, goal, data, generator(task.query_y[0], 0))
        ratio = (logp(*adapt(leaves, pre, True), post) - logp(w1, b1, s1, post)).exp()
        adv = post.rewards.flip(1).cumsum(1).flip(1)
        surr = torch.minimum(ratio * adv, ratio.clamp(1 - eps, 1 + eps) * adv).mean()
        total += torch.cat([g.reshape(-1) for g in torch.autograd.grad(-surr, leaves)])
        clipped += int(((ratio - 1).abs() > eps).sum())
        count += ratio.numel()
    return total, clipped / count


def test_a_later_epoch_at_theta_old_regenerates_the_first_epochs_rollouts_bit_for_bit():
    """An epoch whose current parameters are still theta_old recomputes the one-epoch meta-gradient exactly: the
    rollouts regenerated from the task seeds and theta_old are the ones the first round sampled (float32, the
    job's dtype, second order, linear baseline)."""
    data = NavigationData(horizon=8, rollouts=5)
    model = build_model(MLPSpec(in_features=2, hidden=[16]), 2)
    spec = AlgorithmSpec(
        name="maml_rl", inner=InnerLoopSpec(lr=0.1, steps=2), maml_rl=MAMLRLSpec(outer_objective="ppo", epochs=3)
    )
    alg = build_algorithm(spec, model, data)
    theta = {k: v.detach() for k, v in alg.init(dict(model.named_parameters())).items()}
    tasks = NavigationTasks(data, "train", 2).batch(0, range(3))
    first = meta_gradient(alg, theta, tasks)
    with alg.sampled_by({k: v.clone() for k, v in theta.items()}):
        later = meta_gradient(alg, theta, tasks)
    assert later.metrics.pop("clip_fraction") == 0.0
    assert later.metrics == first.metrics
    for k in theta:
        assert torch.equal(later.grads[k], first.grads[k]), k


def test_a_later_epochs_meta_gradient_matches_a_plain_torch_reimplementation(float64, linear_policy):
    """At theta != theta_old, where some ratios have left [1 - eps, 1 + eps], the platform's epoch gradient (summed
    over 3 tasks) equals the reference's to 1e-10."""
    data, lr, eps = NavigationData(horizon=4, rollouts=6, gamma=1.0), 0.5, 0.2
    policy, theta_old = linear_policy, linear_policy.theta
    alg = policy.algorithm(data, lr, baseline="none", outer_objective="ppo", clip=eps, epochs=2)
    gen = torch.Generator().manual_seed(0)
    theta = {k: v + 0.02 * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in theta_old.items()}
    tasks = _tasks(data)
    expected, fraction = _reference(theta_old, theta, data, tasks, lr, eps)
    assert 0.2 < fraction < 0.8, fraction  # clipping acts on some samples, not all (measured: 0.35)
    with alg.sampled_by(theta_old):
        got = meta_gradient(alg, theta, tasks)
    assert got.metrics["clip_fraction"] / got.tasks == pytest.approx(fraction, abs=1e-12)  # metrics are sums
    torch.testing.assert_close(policy.flat(got.grads), expected, rtol=1e-10, atol=1e-12)
    without = meta_gradient(alg, theta, tasks)  # the same theta sampling its own rollouts: another gradient
    assert float((policy.flat(without.grads) - expected).abs().max()) > 1e-3


def _nav(tmp_path, epochs: int, clip: float = 0.2, steps: int = 2, cluster=None, lr: float = 0.05):
    return parse_spec(
        {
            "name": "nav-ppo",
            "seed": 0,
            "model": {"name": "mlp", "in_features": 2, "hidden": [16, 16]},
            "data": {"source": "navigation", "horizon": 10, "rollouts": 8},
            "algorithm": {
                "name": "maml_rl",
                "inner": {"steps": 1, "lr": 0.1},
                "maml_rl": {"outer_objective": "ppo", "clip": clip, "epochs": epochs},
            },
            "outer": {"optimizer": "adam", "lr": lr, "meta_batch": 4, "steps": steps},
            "eval": {"every": 0, "episodes": 4, "final_episodes": 4},
            "checkpoint": {"dir": str(tmp_path / "ckpt"), "every": 0},
            "logging": {"wandb": {"mode": "disabled"}, "progress": False},
            "cluster": cluster or {"address": "inline"},
        }
    )


def _steps(spec, n: int):
    coord, pool = Coordinator(spec), InlinePool(spec)
    estimate, result = pick(spec, coord), None
    for _ in range(n):
        result = estimate(pool, coord.step, pool.put(coord.published()))
        coord.apply(result)
    return coord, result


def test_clipping_changes_the_update_only_after_the_first_epoch(tmp_path):
    """One meta-step: with one epoch the clip range changes nothing (every ratio is 1); with two, the second
    round's ratios leave the range and a narrow clip gives other parameters than a wide one. The step is one
    step: the coordinator's count moves by 1, the optimiser's by the epochs."""
    params = {}
    for epochs in (1, 2):
        for clip in (0.05, 0.9):
            coord, result = _steps(_nav(tmp_path, epochs, clip), 1)
            params[epochs, clip] = coord.params
            assert coord.step == 1
            assert all(s["step"] == epochs for s in coord.optimizer.state_dict()["state"].values())
            if epochs == 2:
                assert result.metrics["clip_fraction"] > (0.05 if clip == 0.05 else -1), result.metrics
    for k in params[1, 0.05]:
        assert torch.equal(params[1, 0.05][k], params[1, 0.9][k]), k
    assert any(not torch.equal(params[2, 0.05][k], params[2, 0.9][k]) for k in params[2, 0.05])


def test_a_failed_epoch_restores_the_step_start(tmp_path, monkeypatch):
    """A round that fails after an earlier epoch's update puts back theta_old and the optimiser state, so the
    checkpoint written after the error is the state at the step's start (resume happens at step boundaries)."""
    spec = _nav(tmp_path, 3)
    coord, pool = Coordinator(spec), InlinePool(spec)
    start, opt_start = {k: v.detach().clone() for k, v in coord.params.items()}, coord.optimizer.state_dict()
    calls = []
    real = pool.run

    def failing(items, params):
        calls.append(items[0].sampled_by is not None)
        if len(calls) == 3:
            raise RuntimeError("lost")
        return real(items, params)

    monkeypatch.setattr(pool, "run", failing)
    with pytest.raises(RuntimeError, match="lost"):
        pick(spec, coord)(pool, 0, pool.put(coord.published()))
    assert calls == [False, True, True]
    for k, v in start.items():
        assert torch.equal(coord.params[k], v), k
    assert coord.optimizer.state_dict()["state"] == opt_start["state"] == {}


def test_a_resumed_epoch_run_ends_where_an_uninterrupted_one_ends(tmp_path, same_final_params):
    """Steps are whole (E optimiser steps each), so stopping after step 2 and resuming to step 3 gives the bits of
    three steps in one run: the optimiser state in the checkpoint carries the epochs' moments and counts."""
    straight = _nav(tmp_path / "straight", 3, steps=3)
    train(straight)
    train(_nav(tmp_path / "resumed", 3, steps=2))
    resumed = _nav(tmp_path / "resumed", 3, steps=3)
    train(resumed, resume=True)
    same_final_params(straight, resumed)


RAY_WORKERS = {"address": "local", "workers": 2, "timeout": {"min_s": 2.0, "factor": 5.0}}


@pytest.fixture(scope="module")
def clean_epochs(local_ray, tmp_path_factory):
    """A fault-free run of 3 steps of 3 epochs on 2 Ray workers, coordinator aggregation: the reference of the runs
    below (trained once for the module)."""
    spec = _nav(tmp_path_factory.mktemp("clean"), 3, steps=3, cluster=RAY_WORKERS)
    train(spec)
    return spec


def test_a_worker_lost_during_an_epoch_step_ends_bit_identical(clean_epochs, tmp_path, drill, ends_fault_free):
    """Worker 1 exits as it starts meta-step 1 (3 epochs, 2 Ray workers); its slots are recomputed, the later
    rounds run on the rebuilt worker, which regenerates the rollouts from theta_old: the same final parameters."""
    fired = drill("exit:1:1")
    faulty = _nav(tmp_path, 3, steps=3, cluster=RAY_WORKERS)
    ends_fault_free(train(faulty), faulty, clean_epochs, fired)


def test_a_worker_lost_in_a_later_epoch_ends_bit_identical(
    clean_epochs, tmp_path, monkeypatch, caplog, ends_fault_free
):
    """Worker 1 is killed (ray.kill) as meta-step 1's second epoch is sent to it, after the coordinator took the
    step's first update: its slots are recomputed on worker 0, which regenerates the step's rollouts from theta_old's
    reference in the item, and the run ends with the fault-free parameters. (A recomputation that sampled with the
    current parameters instead, e.g. a retry without `sampled_by`, ends elsewhere: checked by breaking the pool.)"""
    sent, killed = [], []
    submit = RemoteReplica.submit

    def submit_then_kill(self, item, params):
        refs = submit(self, item, params)
        if self.index == 1 and item.step == 1:
            sent.append(item.sampled_by is not None)
            if sent == [False, True]:  # epoch 1's item, then epoch 2's: this one is lost
                ray.kill(self.actor, no_restart=False)
                killed.append(len(sent))
        return refs

    monkeypatch.setattr(RemoteReplica, "submit", submit_then_kill)
    faulty = _nav(tmp_path, 3, steps=3, cluster=RAY_WORKERS)
    out = train(faulty)
    assert killed == [2], (killed, sent)
    assert "worker 1 was lost during meta_gradient of step 1" in caplog.text
    ends_fault_free(out, faulty, clean_epochs)


def test_allreduce_aggregation_of_epochs_ends_where_the_coordinators_ends(
    clean_epochs, tmp_path, monkeypatch, caplog, same_final_params
):
    """`cluster.aggregation: allreduce` with 3 epochs: every round of every step, the later ones with theta_old's
    reference in their items, is summed by the workers' gloo group (no fallback); with 2 workers that sum is the
    coordinator's bit for bit (a + b == b + a), so the run ends with the coordinator run's parameters."""
    caplog.set_level(logging.INFO, logger="metascale.cluster.allreduce")
    rounds = []
    step = AllReduce.step

    def counted(self, pool, items, params):
        rounds.append((items[0].step, len(items), items[0].sampled_by is not None))
        return step(self, pool, items, params)

    monkeypatch.setattr(AllReduce, "step", counted)
    spec = _nav(tmp_path, 3, steps=3, cluster={**RAY_WORKERS, "aggregation": "allreduce"})
    out = train(spec)
    assert out["status"] == "finished" and out["worker_failures"] == 0, out
    assert rounds == [(s, 2, later) for s in range(3) for later in (False, True, True)], rounds
    assert caplog.text.count("all-reduce group of 2 workers formed") == 1
    assert "the coordinator aggregates" not in caplog.text
    same_final_params(clean_epochs, spec)


@pytest.mark.parametrize(
    "patch, reason",
    [
        ({"maml_rl": {"epochs": 2}}, "needs outer_objective 'ppo'"),
        ({"maml_rl": {"epochs": 2, "outer_objective": "ppo", "pre_score": True}}, "pre_score false"),
        ({"maml_rl": {"epochs": 0}}, "epochs"),
    ],
)
def test_epochs_without_the_clipped_surrogate_are_refused(patch, reason):
    with pytest.raises(SpecError, match=reason):
        parse_spec({"algorithm": {"name": "maml_rl", **patch}})


def test_epochs_need_the_backprop_estimator():
    job = {
        "model": {"name": "mlp", "in_features": 2},
        "data": {"source": "navigation"},
        "algorithm": {"name": "maml_rl", "maml_rl": {"outer_objective": "ppo", "epochs": 2}},
        "outer": {"estimator": "es"},
    }
    with pytest.raises(SpecError, match="outer.estimator 'backprop'"):
        parse_spec(job)
