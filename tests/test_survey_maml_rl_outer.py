"""MAML-RL's outer step: the PPO-style clipped outer objective against the plain policy gradient and its clipping rule,
and the full second-order meta-gradient (through the sampled REINFORCE inner step, with the E-MAML term for the inner
rollouts' dependence on theta) against an independent pathwise estimate of the same quantity."""

from __future__ import annotations

import math

import pytest
import torch

from metascale.algorithms.executor import meta_gradient
from metascale.algorithms.maml_rl import clipped_surrogate, generator, rollout
from metascale.config import NavigationData, parse_spec
from metascale.data.navigation import NavigationTasks
from metascale.data.tasks import Task, TaskBatch
from metascale.errors import SpecError

GOAL = torch.tensor([0.6, -0.4], dtype=torch.float64)


def test_the_ppo_outer_objective_has_the_plain_policy_gradient_at_the_sampling_policy(linear_policy):
    """One meta-gradient per step, at the parameters that sampled the post-adaptation rollouts: every ratio is 1, so
    the clipped surrogate's meta-gradient (second order, through the inner step, with the linear baseline) is the
    REINFORCE surrogate's, on the same rollouts."""
    data = NavigationData(horizon=6, rollouts=5)
    tasks = NavigationTasks(data, "train", 2).batch(0, range(3))
    tasks = TaskBatch(tasks.support_x.double(), tasks.support_y, tasks.query_x.double(), tasks.query_y)
    policy, theta = linear_policy, linear_policy.theta
    pg = meta_gradient(policy.algorithm(data, 0.5), theta, tasks)
    ppo = meta_gradient(policy.algorithm(data, 0.5, outer_objective="ppo", clip=0.1), theta, tasks)
    assert pg.metrics == ppo.metrics
    torch.testing.assert_close(policy.flat(ppo.grads), policy.flat(pg.grads), rtol=1e-9, atol=1e-12)
    assert float(policy.flat(pg.grads).abs().max()) > 1e-2


def test_clipping_zeroes_the_gradient_of_samples_whose_ratio_left_the_range_in_the_advantage_direction():
    """d/dlogp_i of mean_i min(r_i A_i, clip(r_i) A_i) = r_i A_i / n, except 0 where r_i > 1 + eps with A_i > 0 or
    r_i < 1 - eps with A_i < 0 (there the clipped term is the minimum and does not depend on logp_i)."""
    ratio = torch.tensor([0.5, 0.5, 1.5, 1.5, 1.1, 0.9, 1.0], dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, -2.0, 3.0, 0.5], dtype=torch.float64)
    logp = torch.randn(7, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    (grad,) = torch.autograd.grad(clipped_surrogate(logp, logp.detach() - ratio.log(), adv, 0.2), [logp])
    clipped = torch.tensor([False, True, True, False, False, False, False])
    expected = torch.where(clipped, torch.zeros(7, dtype=torch.float64), ratio * adv / 7)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(
    "maml_rl, reason",
    [({"outer_objective": "trpo"}, "outer_objective"), ({"clip": 1.0}, "clip"), ({"clip": 0}, "clip")],
)
def test_bad_outer_objective_settings_are_refused(maml_rl, reason):
    with pytest.raises(SpecError, match=reason):
        parse_spec({"algorithm": {"name": "maml_rl", "maml_rl": maml_rl}})


def _pathwise(theta0: dict, data: NavigationData, lr: float, n: int, gen: torch.Generator, inner_path: bool):
    """(d/dtheta at `theta0` of the mean of R(post-adaptation rollouts) / horizon over n draws, that mean), every action
    reparameterised as W s + b + exp(log_std) eps, through the clipped dynamics. theta' = theta + lr * g with g the
    REINFORCE surrogate's gradient in the policy's own argument (the copies `Wp, bp, sp`) at data sampled from theta
    (K rollouts); `inner_path=False` holds that data fixed, dropping its dependence on theta."""
    k, h, c = data.rollouts, data.horizon, data.action_clip
    theta = {key: v.clone().requires_grad_(True) for key, v in theta0.items()}
    w, b, s = theta.values()
    pos, obs, acts, rews = torch.zeros(n, k, 2, dtype=torch.float64), [], [], []
    eps = torch.randn(n, k, h, 2, generator=gen, dtype=torch.float64)
    for t in range(h):
        obs.append(pos)
        acts.append(pos @ w.T + b + s.exp() * eps[:, :, t])
        pos = pos + acts[-1].clamp(-c, c)
        rews.append(-(pos - GOAL).norm(dim=-1))
    obs, acts, rews = (torch.stack(x, 2) for x in (obs, acts, rews))
    if not inner_path:
        obs, acts, rews = obs.detach(), acts.detach(), rews.detach()
    returns = rews.flip(-1).cumsum(-1).flip(-1)  # gamma = 1
    wp, bp, sp = w.expand(n, 2, 2), b.expand(n, 2), s.expand(n, 2)
    z = (acts - torch.einsum("nkhi,noi->nkho", obs, wp) - bp[:, None, None]) / sp.exp()[:, None, None]
    logp = (-0.5 * z**2 - sp[:, None, None] - 0.5 * math.log(2 * math.pi)).sum(-1)
    gw, gb, gs = torch.autograd.grad((logp * returns).mean((1, 2)).sum(), [wp, bp, sp], create_graph=True)
    w2, b2, s2 = w + lr * gw, b + lr * gb, s + lr * gs
    pos, ret = torch.zeros(n, k, 2, dtype=torch.float64), 0.0
    eps = torch.randn(n, k, h, 2, generator=gen, dtype=torch.float64)
    for t in range(h):
        a = torch.einsum("nki,noi->nko", pos, w2) + b2[:, None] + s2.exp()[:, None] * eps[:, :, t]
        pos = pos + a.clamp(-c, c)
        ret = ret - (pos - GOAL).norm(dim=-1)
    value = ret.mean() / h
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, list(theta.values()))]), float(value.detach())


def _pre_update_score(theta: dict, data: NavigationData, task: Task) -> torch.Tensor:
    """grad_theta log p_theta(the task's pre-update rollouts), written out for the linear Gaussian policy: zero mean."""
    w, b, s = theta.values()
    ro = rollout(lambda x: x @ w.T + b, s, GOAL, data, generator(task.support_y[0], 0))
    e = (ro.actions - ro.obs @ w.T - b) / s.exp()
    grad_w = torch.einsum("khi,khj->ij", e / s.exp(), ro.obs)
    return torch.cat([grad_w.reshape(-1), (e / s.exp()).sum((0, 1)), (e**2 - 1).sum((0, 1))])


def _mean_se(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.mean(0), x.std(0) / math.sqrt(len(x))


def test_the_full_meta_gradient_matches_an_independent_pathwise_estimate(float64, linear_policy):
    """J(theta) = E_{inner rollouts ~ pi_theta}[E_{rollouts ~ pi_theta'}[R / horizon]], theta' one sampled REINFORCE
    step (horizon 2, 8 rollouts, gamma 1, no baseline, linear policy). The platform estimates dJ/dtheta by the score
    function (outer surrogate through the inner step, plus `pre_score`'s E-MAML term); `_pathwise` differentiates the
    reparameterised rollouts instead. Both split into the path through theta' at fixed inner data and the inner data's
    dependence on theta; each part's mean over 400 tasks is within 4 standard errors of the pathwise one (the E-MAML
    part with the zero-mean control variate -c * score, c = J), and so is the full gradient (measured: |z| < 1.5).
    The second part is 8 standard errors from 0 in one coordinate: without `pre_score` its check fails (z = 5.2;
    the full gradient's alone has less power, z = 3.9)."""
    data, lr = NavigationData(horizon=2, rollouts=8, gamma=1.0, action_clip=0.5), 1.0
    gen = torch.Generator().manual_seed(1)
    policy, theta = linear_policy, linear_policy.theta
    full = [_pathwise(theta, data, lr, 1000, gen, True) for _ in range(8)]
    fixed = torch.stack([_pathwise(theta, data, lr, 1000, gen, False)[0] for _ in range(8)])
    c = sum(v for _, v in full) / len(full)
    pw_full, pw_fixed = _mean_se(torch.stack([g for g, _ in full])), _mean_se(fixed)
    plain = policy.algorithm(data, lr, baseline="none")
    emaml = policy.algorithm(data, lr, baseline="none", pre_score=True)
    g0, g1, score = [], [], []
    for i in range(400):
        task = Task(GOAL[None], torch.tensor([2 * i + 1]), GOAL[None], torch.tensor([2 * i + 2]))
        g0.append(-policy.flat(meta_gradient(plain, theta, TaskBatch.stack([task])).grads))
        g1.append(-policy.flat(meta_gradient(emaml, theta, TaskBatch.stack([task])).grads))
        score.append(_pre_update_score(theta, data, task))
    g0, g1, score = torch.stack(g0), torch.stack(g1), torch.stack(score)

    def z(estimates, reference):
        (m, se), (ref, ref_se) = _mean_se(estimates), reference
        return (m - ref) / (se**2 + ref_se**2).sqrt()

    pw_inner_data = (pw_full[0] - pw_fixed[0], (pw_full[1] ** 2 + pw_fixed[1] ** 2).sqrt())
    assert float(z(g0, pw_fixed).abs().max()) < 4, z(g0, pw_fixed)
    assert float(z(g1 - g0 - c * score, pw_inner_data).abs().max()) < 4, z(g1 - g0 - c * score, pw_inner_data)
    assert float(z(g1 - c * score, pw_full).abs().max()) < 4, z(g1 - c * score, pw_full)
    # Power: each part is many of the platform's standard errors from 0, what an estimator without it would give.
    assert float((pw_fixed[0].abs() / _mean_se(g0)[1]).max()) > 4
    assert float((pw_inner_data[0].abs() / _mean_se(g1 - g0 - c * score)[1]).max()) > 6
