"""Amortized Bayesian Meta-Learning (ABML; Ravi & Beatson, ICLR 2019): meta-learn a Gaussian prior over the weights,
p(theta | psi) = N(mu, sigma^2) per weight, and infer each task's posterior q(theta | phi) = N(mu', sigma'^2) by a
few gradient steps on the support set's negative ELBO starting from the prior (phi_0 = psi: amortised inference).

Inner step:  phi <- phi - lr * grad_phi [ mean_s CE(support | theta_s) + kl_weight * KL(q_phi || p_psi) ],
             theta_s = mu' + sigma' * eps_s (reparameterised, `abml.samples` draws).
Meta-loss:   mean_s CE(query | theta_s) + kl_weight * KL(q_phi || p_psi) + kl_weight * (-log p(psi)),
             with the hyperprior p(psi) = N(mu; 0, 1) Gamma(1 / sigma^2; 1, 0.01) (`abml.hyperprior`); the executor
             averages the per-task terms, so the hyperprior counts once per meta-step.
Prediction:  the query's predictive distribution is the mean of the softmax over Monte-Carlo draws (`abml.samples`
             in training, `abml.eval_samples` in evaluation); accuracy, NLL and ECE are computed from it.
The weighting of KL and hyperprior by `kl_weight` beside a mean cross-entropy follows the public re-implementation
github.com/cnguyen10/few_shot_meta_learning (Abml.py). Meta-parameters: the prior means under the model's own names
(what a checkpoint user loads as the model: the prior's mode) and their log standard deviations, `abml.log_std.*`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from metascale.algorithms.base import MetaAlgorithm, Params, TaskOutput, register, task_metrics
from metascale.algorithms.inner import gradient_descent
from metascale.data.tasks import Task

LOG_STD = "abml.log_std."
GAMMA_RATE = 0.01  # the hyperprior's Gamma(1, 0.01) on each precision 1 / sigma^2


def gaussian_kl(q_mu: Params, q_log_std: Params, p_mu: Params, p_log_std: Params) -> Tensor:
    """KL(N(q_mu, q_std^2) || N(p_mu, p_std^2)) summed over every weight (diagonal Gaussians)."""
    total = 0.0
    for k in q_mu:
        var_ratio = torch.exp(2 * (q_log_std[k] - p_log_std[k]))
        mean_term = (q_mu[k] - p_mu[k]) ** 2 * torch.exp(-2 * p_log_std[k])
        total = total + 0.5 * (var_ratio + mean_term - 1).sum() - (q_log_std[k] - p_log_std[k]).sum()
    return total  # type: ignore[return-value]


def hyperprior_nll(mu: Params, log_std: Params) -> Tensor:
    """-log p(psi) up to a constant: N(0, 1) on each mean, Gamma(shape 1, rate 0.01) on each precision."""
    total = 0.0
    for k in mu:
        total = total + 0.5 * (mu[k] ** 2).sum() + GAMMA_RATE * torch.exp(-2 * log_std[k]).sum()
    return total  # type: ignore[return-value]


@register
class ABML(MetaAlgorithm):
    name = "abml"

    def init(self, model_params: Params) -> Params:
        log_std = self.spec.abml.init_log_std
        return {**model_params, **{LOG_STD + k: torch.full_like(v, log_std) for k, v in model_params.items()}}

    def model_params(self, meta_params: Params) -> Params:
        return {k: v for k, v in meta_params.items() if not k.startswith(LOG_STD)}

    def split(self, params: Params) -> tuple[Params, Params]:
        """(means, log standard deviations) under the model's weight names."""
        mu = self.model_params(params)
        return mu, {k: params[LOG_STD + k] for k in mu}

    def sample(self, mu: Params, log_std: Params) -> Params:
        return {k: mu[k] + torch.exp(log_std[k]) * torch.randn_like(mu[k]) for k in mu}

    def mc_log_probs(self, mu: Params, log_std: Params, x: Tensor, samples: int) -> tuple[Tensor, Tensor]:
        """(mean cross-entropy's per-draw log-softmax stack [samples, n, C], log of the mean predictive [n, C])."""
        logp = torch.stack([F.log_softmax(self.f(self.sample(mu, log_std), x), -1) for _ in range(samples)])
        return logp, torch.logsumexp(logp, 0) - math.log(samples)

    def task_objective(self, meta_params: Params, task: Task, steps: int | None = None) -> TaskOutput:
        s = self.spec.abml
        prior_mu, prior_log_std = self.split(meta_params)
        training = torch.is_grad_enabled()
        samples = s.samples if training else s.eval_samples

        def negative_elbo(q: Params, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            mu, log_std = self.split(q)
            logp, predictive = self.mc_log_probs(mu, log_std, x, samples)
            nll = -logp.gather(-1, y.expand(samples, -1).unsqueeze(-1)).mean()
            kl = gaussian_kl(mu, log_std, prior_mu, prior_log_std)
            return nll + s.kl_weight * kl, kl, predictive

        posterior = gradient_descent(
            lambda q: negative_elbo(q, task.support_x, task.support_y)[0],
            dict(meta_params),
            steps=self.spec.inner.steps if steps is None else steps,
            lr=self.spec.inner.lr,
            first_order=self.spec.inner.first_order,
            checkpoint=self.spec.inner.checkpoint != "none",
        )
        objective, kl, predictive = negative_elbo(posterior, task.query_x, task.query_y)
        if s.hyperprior:
            objective = objective + s.kl_weight * hyperprior_nll(prior_mu, prior_log_std)
        nll = F.nll_loss(predictive, task.query_y)
        return TaskOutput(objective, {**task_metrics(predictive, task.query_y, nll), "kl": kl.detach()})
