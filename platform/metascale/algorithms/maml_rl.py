"""MAML-RL (Finn et al. 2017, section 5.3) on the 2D navigation tasks (data/navigation.py).

The policy is a Gaussian over actions: mean = the model (an MLP over the agent's position), a state-free log
standard deviation per action dimension (meta-parameter `policy_log_std`). Per task, on the worker that runs the task:

- inner loop (`inner.steps` steps of `inner.lr`): sample `rollouts` trajectories with the current policy, weigh each
  log-probability by its advantage (discounted return-to-go minus Duan et al. (2016)'s linear feature baseline fit to
  these rollouts), and step up the REINFORCE surrogate mean_{k,t} log pi(a_kt | s_kt) A_kt, differentiably
  (`create_graph`) unless `inner.first_order`;
- outer step: the same surrogate on fresh rollouts of the adapted policy, differentiated through the inner steps to
  the initialisation (plain policy gradient through the inner step, as in Finn et al.'s MAML-RL; the outer optimiser
  is `outer.optimizer`, not TRPO). With `maml_rl.pre_score` the estimator also gets the score of the pre-update
  rollouts times the post-update return, which makes it unbiased for the gradient of the expected post-update return
  (the data the inner step adapts on depends on theta too; E-MAML, Stadie et al. 2018), at a higher variance. The
  estimates are of the gradient of the return / horizon; with `gamma` < 1 the surrogates weigh discounted returns-to-go
  (the usual variance-reducing approximation) while the return in the score term is undiscounted.
- `maml_rl.outer_objective: ppo` replaces the outer surrogate by PPO's clipped one (Schulman et al. 2017),
  mean_{k,t} min(r A, clip(r, 1 - eps, 1 + eps) A) with r = pi_theta'(a|s) / pi_old'(a|s), pi_old' the adapted
  policy that sampled the post-update rollouts, its log-probs recorded at sampling. With `maml_rl.epochs` 1 the
  meta-gradient is taken at the parameters that sampled the rollouts, so r = 1 (to rounding: the recorded and the
  recomputed log-probs may differ in the last float32 bit) and the gradient is the 'pg' one.
- `maml_rl.epochs` E > 1: PPO's epochs, as in MAML-PPO / ProMP (Rothfuss et al. 2019): the meta-step takes E
  meta-optimiser steps on one batch of rollouts (cluster/estimators.py `epochs`). Round e > 0 runs inside
  `sampled_by(theta_old)`: the rollouts are regenerated from the task seeds with theta_old and its own adapted
  policy (the same trajectories, bit for bit), the current theta adapts on theta_old's pre-update rollouts with the
  plain REINFORCE surrogate (as learn2learn's MAML-TRPO re-adapts at each line-search step; ProMP weighs the inner
  surrogate by pi_theta / pi_old, whose second-order terms make a different estimator, and at E = 1 would not equal
  the 'pg' meta-gradient), and the clipped surrogate scores the post-update rollouts against pi_old'. A 'clip_fraction'
  metric (|r - 1| > eps) reports how far the round's adapted policy has moved. Measured on navigation (40 steps, two
  seeds; docs/survey-map.md): four epochs did not beat one at the same rollouts, with Adam at lr 0.01 or 0.0025.

Action noise comes from the task's seeds (support_y, query_y), so a re-run slot samples the same trajectories.
Metrics: `return` (post-adaptation, undiscounted, mean over rollouts), `return_pre` (the first inner step's
rollouts: the policy before adaptation) and `loss` = -return.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from metascale.algorithms.base import MetaAlgorithm, Params, TaskOutput, register
from metascale.config import HalfCheetahDirData, NavigationData
from metascale.data import output_dim
from metascale.data.navigation import move
from metascale.data.tasks import Task

LOG_STD = "policy_log_std"


@dataclass(frozen=True)
class Rollouts:
    obs: Tensor  # [K, H, 2] positions the actions were taken at
    actions: Tensor  # [K, H, 2] raw (unclipped) actions
    rewards: Tensor  # [K, H]
    logp: Tensor  # [K, H] log pi(a_kt | s_kt) of the policy that sampled them, recorded then (no graph)


def generator(seed: Tensor, index: int) -> torch.Generator:
    """Rollout noise stream `index` of a task seed (inner step i: index i; post-adaptation: the query seed's 0)."""
    state = np.random.SeedSequence([int(seed), index]).generate_state(2, np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))


def rollout(mean, log_std: Tensor, goal: Tensor, data: NavigationData, gen: torch.Generator) -> Rollouts:
    """`data.rollouts` trajectories from the origin, vectorised over trajectories; no graph. (The HalfCheetah
    tasks' come from MuJoCo: data/halfcheetah.py, with `goal` their direction.)"""
    if isinstance(data, HalfCheetahDirData):
        from metascale.data.halfcheetah import rollout as cheetah_rollout

        obs, actions, rewards = cheetah_rollout(mean, log_std, goal, data, gen)
        with torch.no_grad():  # the sampling policy's log-probs, as the navigation loop records them below
            mu = mean(obs.reshape(-1, obs.shape[-1])).reshape(actions.shape)
            return Rollouts(obs, actions, rewards, gaussian_log_prob(actions, mu, log_std))
    k, h = data.rollouts, data.horizon
    noise = torch.randn(h, k, 2, generator=gen, dtype=goal.dtype).to(goal.device)
    with torch.no_grad():
        std, pos = log_std.exp(), torch.zeros(k, 2, dtype=goal.dtype, device=goal.device)
        obs, acts, rews, logps = [], [], [], []
        for t in range(h):
            mu = mean(pos)
            a = mu + std * noise[t]
            obs.append(pos)
            acts.append(a)
            logps.append(gaussian_log_prob(a, mu, log_std))
            pos, r = move(pos, a, goal, data.action_clip)
            rews.append(r)
    return Rollouts(*(torch.stack(x, 1) for x in (obs, acts, rews, logps)))


def gaussian_log_prob(actions: Tensor, mu: Tensor, log_std: Tensor) -> Tensor:
    z = (actions - mu) / log_std.exp()
    return (-0.5 * z**2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)


def log_prob(mean, log_std: Tensor, ro: Rollouts) -> Tensor:
    """log pi(a_kt | s_kt) [K, H], differentiable w.r.t. the policy's parameters."""
    return gaussian_log_prob(ro.actions, mean(ro.obs.reshape(-1, ro.obs.shape[-1])).reshape(ro.actions.shape), log_std)


def clipped_surrogate(logp: Tensor, logp_old: Tensor, adv: Tensor, clip: float) -> Tensor:
    """PPO's mean min(r A, clip(r, 1 - clip, 1 + clip) A), r = exp(logp - logp_old): a sample whose ratio has moved
    past the range in its advantage's direction contributes no gradient."""
    ratio = (logp - logp_old).exp()
    return torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv).mean()


def returns_to_go(rewards: Tensor, gamma: float) -> Tensor:
    """G_t = sum_{t' >= t} gamma^(t'-t) r_t', [K, H]."""
    h = rewards.shape[1]
    t = torch.arange(h, dtype=rewards.dtype, device=rewards.device)
    lag = t[:, None] - t[None, :]  # [t', t]
    disc = torch.where(lag >= 0, gamma ** lag.clamp(min=0), torch.zeros_like(lag))
    return rewards @ disc


def linear_baseline(obs: Tensor, returns: Tensor, reg: float) -> Tensor:
    """Duan et al. (2016)'s linear feature baseline (rllab's LinearFeatureBaseline): ridge regression of the returns on
    [s, s^2, t/100, (t/100)^2, (t/100)^3, 1] over these rollouts; its ridge grows x10 while the solve is not finite."""
    k, h, _ = obs.shape
    o = obs.clamp(-10, 10).double()
    al = (torch.arange(h, dtype=torch.float64, device=obs.device) / 100.0)[None, :, None].expand(k, h, 1)
    feats = torch.cat([o, o**2, al, al**2, al**3, torch.ones_like(al)], -1).reshape(k * h, -1)
    y = returns.reshape(-1, 1).double()
    eye = torch.eye(feats.shape[1], dtype=torch.float64, device=obs.device)
    for _ in range(5):
        w = torch.linalg.solve(feats.T @ feats + reg * eye, feats.T @ y)
        if torch.isfinite(w).all():
            break
        reg *= 10
    return (feats @ w).reshape(k, h).to(returns.dtype)


def advantages(ro: Rollouts, data: NavigationData, baseline: str, reg: float) -> Tensor:
    g = returns_to_go(ro.rewards, data.gamma)
    return g - linear_baseline(ro.obs, g, reg) if baseline == "linear" else g


@register
class MAMLRL(MetaAlgorithm):
    name = "maml_rl"
    data: NavigationData | HalfCheetahDirData  # the job's data section: the environment

    def init(self, model_params: Params) -> Params:
        dtype = next(iter(model_params.values())).dtype
        log_std = torch.full((output_dim(self.data),), self.spec.maml_rl.init_log_std, dtype=dtype)
        return {**model_params, LOG_STD: log_std}

    def model_params(self, meta_params: Params) -> Params:
        return {k: v for k, v in meta_params.items() if k != LOG_STD}

    def _mean(self, params: Params):
        model = self.model_params(params)
        return lambda x: self.f(model, x)

    def surrogate(self, params: Params, ro: Rollouts, clipped: bool = False) -> tuple[Tensor, Tensor]:
        """(mean_{k,t} log pi * A: its gradient is the REINFORCE estimate of grad J / horizon, the log-probs);
        `clipped`: PPO's clipped surrogate instead, whose gradient at the sampling policy is the same."""
        cfg = self.spec.maml_rl
        logp = log_prob(self._mean(params), params[LOG_STD], ro)
        adv = advantages(ro, self.data, cfg.baseline, cfg.baseline_reg)
        if clipped:
            return clipped_surrogate(logp, ro.logp, adv, cfg.clip), logp
        return (logp * adv).mean(), logp

    @contextlib.contextmanager
    def sampled_by(self, old: Params) -> Iterator[None]:
        """PPO epochs after a step's first: the task objectives inside sample with `old` (theta_old, the parameters
        that sampled the step's rollouts: the same trajectories, regenerated from the task seeds) and adapt and score
        the meta-parameters they are given on them."""
        self._old = old
        try:
            yield
        finally:
            self._old = None

    def task_objective(self, meta_params: Params, task: Task, steps: int | None = None) -> TaskOutput:
        train = torch.is_grad_enabled()
        if not train:  # evaluation: the inner steps still need gradients, of a copy
            meta_params = {k: v.detach().requires_grad_(True) for k, v in meta_params.items()}
        with torch.enable_grad():
            return self._objective(meta_params, task, self.spec.inner.steps if steps is None else steps, train)

    def _objective(self, meta: Params, task: Task, steps: int, train: bool) -> TaskOutput:
        inner, data, goal = self.spec.inner, self.data, task.support_x[0]
        create_graph = train and not inner.first_order
        old = getattr(self, "_old", None)
        fast, score, ret_pre = dict(meta), None, None
        sampler = None if old is None else {k: v.detach().requires_grad_(True) for k, v in old.items()}
        for i in range(steps):
            src = fast if sampler is None else sampler
            ro = rollout(self._mean(src), src[LOG_STD], goal, data, generator(task.support_y[0], i))
            ret_pre = ro.rewards.sum(1).mean() if ret_pre is None else ret_pre
            if sampler is not None:  # theta_old's own inner step, the same ops as its epoch's: the same next rollouts
                sampler = {k: v.detach().requires_grad_(True) for k, v in self._step(sampler, ro, create_graph).items()}
            surr, logp = self.surrogate(fast, ro)
            score = logp.sum() if score is None else score + logp.sum()
            fast = self._step(fast, ro, create_graph, surr)
        src = fast if sampler is None else sampler
        ro = rollout(self._mean(src), src[LOG_STD], goal, data, generator(task.query_y[0], 0))
        ret = ro.rewards.sum(1).mean()
        surr, logp = self.surrogate(fast, ro, clipped=self.spec.maml_rl.outer_objective == "ppo")
        objective = -surr
        if self.spec.maml_rl.pre_score and score is not None:  # E[R' * grad log p_theta(pre-update rollouts)]
            objective = objective - (score - score.detach()) * ret / data.horizon  # the surrogate's 1/horizon
        metrics = {"loss": -ret, "return": ret, "return_pre": ret if ret_pre is None else ret_pre}
        if old is not None:  # how far this epoch's adapted policy has moved from the sampling one
            metrics["clip_fraction"] = (
                ((logp.detach() - ro.logp).exp() - 1).abs().gt(self.spec.maml_rl.clip).double().mean()
            )
        return TaskOutput(objective, metrics)

    def _step(self, fast: Params, ro: Rollouts, create_graph: bool, surr: Tensor | None = None) -> Params:
        """One inner step of `inner.lr` up the REINFORCE surrogate on `ro` (`surr`, when already computed)."""
        surr = self.surrogate(fast, ro)[0] if surr is None else surr
        names = list(fast)
        grads = torch.autograd.grad(surr, [fast[k] for k in names], create_graph=create_graph, allow_unused=True)
        return {k: fast[k] if g is None else fast[k] + self.spec.inner.lr * g for k, g in zip(names, grads)}
