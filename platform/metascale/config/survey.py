"""Knobs of the algorithms that fill the rest of the survey's map (docs/survey-map.md): domain generalisation,
dataset distillation, architecture search, black-box and Bayesian learners."""

from __future__ import annotations

from pydantic import model_validator

from metascale.config.base import NonNegFloat, PositiveFloat, PositiveInt, Spec


class MLDGSpec(Spec):
    """MLDG (Li et al. 2018): objective L_tr(theta) + beta * L_te(theta - inner.lr * grad L_tr(theta))."""

    beta: PositiveFloat = 1.0


class DistillSpec(Spec):
    """Dataset distillation (Wang et al. 2018): `images_per_class` synthetic examples of `shape` per class and the
    inner learning rate (starting at `init_lr`) are the meta-parameters (algorithms/distill.py)."""

    images_per_class: PositiveInt = 1
    shape: list[PositiveInt] = [1, 28, 28]  # one example's shape: the data's (channels, size, size)
    init_lr: PositiveFloat = 0.02


class DartsAlgorithmSpec(Spec):
    """DARTS as a meta-representation (algorithms/darts.py)."""

    # false: alpha gets no meta-gradient and stays a uniform mixture; only the initialisation is meta-learned (the
    # fixed-architecture baseline of the same network at the same cost)
    learn_alpha: bool = True


class BlackBoxSpec(Spec):
    """The black-box learner's transformer (algorithms/blackbox.py): tokens of width `dim`, `depth` pre-norm blocks."""

    dim: PositiveInt = 64
    depth: PositiveInt = 2
    heads: PositiveInt = 4
    mlp_ratio: PositiveFloat = 2.0

    @model_validator(mode="after")
    def _heads_divide(self) -> "BlackBoxSpec":
        if self.dim % self.heads:
            raise ValueError(f"blackbox.dim ({self.dim}) must be a multiple of blackbox.heads ({self.heads})")
        return self


class ABMLSpec(Spec):
    """ABML (algorithms/abml.py): a meta-learned Gaussian prior over the weights, variational inference per task."""

    # Weight of KL(q || prior) (and of the hyperprior) beside the mean cross-entropy. The KL sums over every weight and
    # penalises the inner step's size (lr g)^2 / 2 sigma^2: 3e-5 (the KL at the cross-entropy's size at the start on
    # Conv-4) made ABML under-confident and slow; 3e-6 is better calibrated and more accurate (docs/survey-map.md, ABML).
    kl_weight: NonNegFloat = 3e-6
    samples: PositiveInt = 2  # Monte-Carlo weight draws per step (inner and query) in training
    eval_samples: PositiveInt = 10  # the same when evaluating (averaged into the predictive distribution)
    init_log_std: float = -5.0  # the prior's log standard deviation at the start, every weight
    # N(0, 1) on the prior's means, Gamma(1, 0.01) on its precisions (the paper's choice); off by default: on Conv-4
    # its Gamma term outweighs the data term by 10^5 (docs/survey-map.md, ABML).
    hyperprior: bool = False
