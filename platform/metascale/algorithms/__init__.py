"""Meta-learning algorithms by name (pure functions over parameter dicts; see base.py)."""

from __future__ import annotations

from torch import nn

from metascale.algorithms import anil, maml, metasgd, protonet, reptile  # noqa: F401  (registers them)
from metascale.algorithms import imaml, learned_hparams, learned_loss, mwn  # noqa: F401,E402  (the survey axes)
from metascale.algorithms import distill, mldg  # noqa: F401,E402  (domain generalisation, dataset distillation)
from metascale.algorithms import darts  # noqa: F401,E402  (architecture search)
from metascale.algorithms import lopt  # noqa: F401,E402  (learned optimisers)
from metascale.algorithms import abml, blackbox  # noqa: F401,E402  (black-box and Bayesian learners)
from metascale.algorithms import maml_rl  # noqa: F401,E402  (meta-reinforcement learning)
from metascale.algorithms.base import ALGORITHMS, MetaAlgorithm, Params, TaskOutput
from metascale.config import AlgorithmSpec, DataSpec


def build_algorithm(spec: AlgorithmSpec, model: nn.Module, data: DataSpec | None = None) -> MetaAlgorithm:
    """`data`: the job's data section, for algorithms that act in the tasks themselves (maml_rl's environment)."""
    return ALGORITHMS[spec.name](spec, model, data)


__all__ = ["ALGORITHMS", "MetaAlgorithm", "Params", "TaskOutput", "build_algorithm"]
