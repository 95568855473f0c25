"""Knobs of the HalfCheetah direction tasks (data/halfcheetah.py), meta-RL's MuJoCo task family."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from metascale.config.base import NonNegFloat, PositiveInt, Spec
from metascale.extras import available

OBS_DIM, ACTION_DIM = 17, 6  # data/assets/planar_cheetah.xml: qpos without rootx (8) + qvel (9); six joint torques


class HalfCheetahDirData(Spec):
    """Finn et al. (2017), section 5.3: a task is a direction d in {-1, +1}; the reward per step is d times the
    forward velocity of the torso minus `ctrl_cost` x ||clip(a, -1, 1)||^2. Each task runs `rollouts` trajectories of
    `horizon` steps (`frame_skip` physics steps of 0.01 s each) per inner step and as many after adaptation, from the
    rest pose perturbed by `reset_noise` (uniform on qpos, Gaussian on qvel). Needs
    the `rl` extra (mujoco)."""

    source: Literal["halfcheetah_dir"] = "halfcheetah_dir"
    horizon: PositiveInt = 200  # the paper's; CI's test uses far fewer
    rollouts: PositiveInt = 20
    frame_skip: PositiveInt = 5
    ctrl_cost: NonNegFloat = 0.05  # Finn et al.'s code: 0.5 x 0.1 x ||a||^2
    reset_noise: NonNegFloat = 0.1
    gamma: Annotated[float, Field(gt=0, le=1)] = 0.99  # discount of the returns the policy gradient weighs

    @model_validator(mode="after")
    def _mujoco(self) -> "HalfCheetahDirData":
        if not available("mujoco"):
            raise ValueError(
                "source 'halfcheetah_dir' needs mujoco, which is not installed: pip install 'metascale[rl]'"
            )
        return self
