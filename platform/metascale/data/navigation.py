"""The 2D navigation tasks of the MAML paper (Finn et al. 2017, section 5.3), written in torch.

A point agent starts at the origin; a task is a goal in [-goal_range, goal_range]^2; each step moves the agent by the
action clipped to [-action_clip, action_clip] per coordinate and pays minus the distance to the goal after the move.
The environment is this module's `move`; the rollouts themselves run where the algorithm's task objective runs (the
workers: algorithms/maml_rl.py).

As a TaskSource a task carries its goal (support_x = query_x, [1, 2]) and the seeds of its rollouts' action noise
(support_y: the inner steps', query_y: the post-adaptation rollouts'), all drawn from (seed, split, step, slot), so
any worker re-running a slot samples the same trajectories.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from metascale.config import NavigationData
from metascale.data.tasks import Split, Task, TaskBatch, episode_rng


def move(pos: Tensor, action: Tensor, goal: Tensor, clip: float) -> tuple[Tensor, Tensor]:
    """(next positions, rewards) for positions and raw actions [..., 2]."""
    nxt = pos + action.clamp(-clip, clip)
    return nxt, -(nxt - goal).norm(dim=-1)


class NavigationTasks:
    def __init__(self, spec: NavigationData, split: Split, seed: int):
        self.spec, self.split, self.seed = spec, split, seed

    def task(self, step: int, slot: int) -> Task:
        rng = episode_rng(self.seed, self.split, step, slot)
        goal = torch.from_numpy(rng.uniform(-self.spec.goal_range, self.spec.goal_range, (1, 2))).float()
        seeds = torch.from_numpy(rng.integers(0, 2**62, 2)).long()
        return Task(goal, seeds[:1], goal.clone(), seeds[1:])

    def batch(self, step: int, slots: Sequence[int]) -> TaskBatch:
        return TaskBatch.stack([self.task(step, slot) for slot in slots])
