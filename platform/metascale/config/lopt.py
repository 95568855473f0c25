"""Knobs of the learned optimiser (`algorithm.lopt`) and of its truncated-unroll estimators (`outer.pes`)."""

from __future__ import annotations

from metascale.config.base import PositiveFloat, PositiveInt, Spec


class LOptSpec(Spec):
    """The per-parameter MLP optimiser (algorithms/lopt.py): step = d * exp(m * exp_mult) * step_mult."""

    hidden: PositiveInt = 32
    layers: PositiveInt = 2
    step_mult: PositiveFloat = 0.01  # learned_optimization's MLPLOpt uses 0.001; larger starts learning sooner
    exp_mult: PositiveFloat = 0.01


class PESSpec(Spec):
    """Truncated unrolls (outer.estimator 'pes' or 'tbptt', algorithms/pes.py): an inner run of
    `algorithm.inner.steps` steps is cut into truncations of `truncation` steps, one per meta-step; `outer.meta_batch`
    particles (antithetic pairs for 'pes') keep their inner state across them."""

    truncation: PositiveInt = 10
    sigma: PositiveFloat = 0.01  # 'pes': the perturbation's standard deviation
    stagger: bool = True  # spread the particles' resets over the inner run
