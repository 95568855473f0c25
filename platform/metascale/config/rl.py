"""Knobs of meta-reinforcement learning (algorithms/maml_rl.py): the 2D navigation task family of the MAML paper
(data/navigation.py) and MAML-RL's policy and estimator."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from metascale.config.base import PositiveFloat, PositiveInt, Spec


class NavigationData(Spec):
    """Finn et al. (2017), section 5.3: a point agent starts at the origin; a task is a goal drawn uniformly from
    [-goal_range, goal_range]^2; the reward per step is minus the distance to the goal after the move; actions are
    clipped to [-action_clip, action_clip] per coordinate. Each task runs `rollouts` trajectories of `horizon` steps
    per inner step and as many after adaptation."""

    source: Literal["navigation"] = "navigation"
    horizon: PositiveInt = 100
    rollouts: PositiveInt = 20
    goal_range: PositiveFloat = 0.5
    action_clip: PositiveFloat = 0.1
    gamma: Annotated[float, Field(gt=0, le=1)] = 0.99  # discount of the returns the policy gradient weighs


class MAMLRLSpec(Spec):
    """MAML-RL's Gaussian policy and policy-gradient estimator (algorithms/maml_rl.py)."""

    init_log_std: float = 0.0  # the policy's log standard deviation at the start (a meta-parameter, state-free)
    baseline: Literal["linear", "none"] = "linear"  # Duan et al. (2016)'s linear feature baseline, fit per batch
    baseline_reg: PositiveFloat = 1e-5  # its ridge coefficient
    # Add the score of the pre-update rollouts times the post-update return: the gradient of the expected
    # post-update return including how theta shapes the adaptation data (E-MAML; Finn et al.'s code drops it).
    pre_score: bool = False
    # The outer objective on the adapted policy's rollouts: the REINFORCE surrogate ('pg'), or PPO's clipped surrogate
    # (Schulman et al. 2017) of the ratio to the log-probs the sampling policy recorded ('ppo'; at `epochs` 1 the ratio
    # is 1 and the gradient is the 'pg' one: algorithms/maml_rl.py says why).
    outer_objective: Literal["pg", "ppo"] = "pg"
    clip: Annotated[float, Field(gt=0, lt=1)] = 0.2  # 'ppo': the ratio's range [1 - clip, 1 + clip]
    # 'ppo': meta-optimiser steps per meta-step, each one a meta-gradient round over the same sampled rollouts (PPO's
    # epochs, as in MAML-PPO/ProMP); 1 is one step per fresh batch of rollouts.
    epochs: PositiveInt = 1

    @model_validator(mode="after")
    def _epochs_need_ppo(self) -> "MAMLRLSpec":
        """Later epochs reuse rollouts of an older policy: only the clipped, ratio-weighted surrogate corrects for
        that, and `pre_score`'s term assumes rollouts of the current one."""
        if self.epochs > 1 and (self.outer_objective != "ppo" or self.pre_score):
            raise ValueError(
                f"epochs {self.epochs} reuse the step's rollouts: needs outer_objective 'ppo' and pre_score false"
            )
        return self
