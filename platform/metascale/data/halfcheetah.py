"""The HalfCheetah direction tasks of the MAML paper (Finn et al. 2017, section 5.3) on MuJoCo.

The robot is metascale's own planar cheetah (assets/planar_cheetah.xml, written for this project in the spirit of
Wawrzynski's half-cheetah; not gymnasium's asset, so returns are not comparable with published HalfCheetah figures),
observed as qpos without the torso's x (8) and qvel (9). A task is a direction d in {-1, +1}; each
step applies the action clipped to [-1, 1] for `frame_skip` physics steps and pays d x (x_after - x_before) / dt minus
`ctrl_cost` x ||clipped action||^2.

As a TaskSource a task carries its direction (support_x = query_x, [1, 1]) and the seeds of its rollouts' noise
(support_y: the inner steps', query_y: the post-adaptation rollouts'), all drawn from (seed, split, step, slot), so any
worker re-running a slot samples the same trajectories. The rollouts (`rollout`) run inside the algorithm's task
objective (algorithms/maml_rl.py), so on the Ray workers: a batch of mujoco.MjData stepped in a Python loop, the torch
policy evaluated once per time step on all of them. mujoco (the `rl` extra) is imported only here, when a rollout runs.
"""

from __future__ import annotations

import os
from functools import lru_cache
from importlib.resources import files
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from metascale.config.halfcheetah import ACTION_DIM, HalfCheetahDirData
from metascale.data.tasks import Split, Task, TaskBatch, episode_rng
from metascale.extras import require


class HalfCheetahDirTasks:
    def __init__(self, spec: HalfCheetahDirData, split: Split, seed: int):
        self.spec, self.split, self.seed = spec, split, seed

    def task(self, step: int, slot: int) -> Task:
        rng = episode_rng(self.seed, self.split, step, slot)
        direction = torch.tensor([[rng.choice([-1.0, 1.0])]])
        seeds = torch.from_numpy(rng.integers(0, 2**62, 2)).long()
        return Task(direction, seeds[:1], direction.clone(), seeds[1:])

    def batch(self, step: int, slots: Sequence[int]) -> TaskBatch:
        return TaskBatch.stack([self.task(step, slot) for slot in slots])


def _mujoco():
    """mujoco without its OpenGL context: nothing here renders, and a headless node has no display for GLFW."""
    os.environ.setdefault("MUJOCO_GL", "disable")
    return require("mujoco")


@lru_cache(maxsize=1)
def cheetah_model():
    """The compiled MjModel, once per process (a worker reuses it for every rollout)."""
    mujoco = _mujoco()
    return mujoco.MjModel.from_xml_path(str(files("metascale.data") / "assets" / "planar_cheetah.xml"))


def rollout(
    mean: Callable[[Tensor], Tensor],
    log_std: Tensor,
    direction: Tensor,
    data: HalfCheetahDirData,
    gen: torch.Generator,
) -> tuple[Tensor, Tensor, Tensor]:
    """(observations [K, H, 17], raw actions [K, H, 6], rewards [K, H]) of `data.rollouts` trajectories; no graph.
    The start-state and action noise both come from `gen`."""
    mujoco, model = _mujoco(), cheetah_model()
    k, h, dtype = data.rollouts, data.horizon, log_std.dtype
    qpos0 = torch.rand(k, model.nq, generator=gen, dtype=torch.float64) * 2 - 1
    qvel0 = torch.randn(k, model.nv, generator=gen, dtype=torch.float64)
    noise = torch.randn(h, k, ACTION_DIM, generator=gen, dtype=dtype).to(log_std.device)
    envs = [mujoco.MjData(model) for _ in range(k)]
    for i, env in enumerate(envs):
        env.qpos[:] = model.qpos0 + data.reset_noise * qpos0[i].numpy()
        env.qvel[:] = data.reset_noise * qvel0[i].numpy()
        mujoco.mj_forward(model, env)
    dt, d = model.opt.timestep * data.frame_skip, float(direction.reshape(-1)[0])
    obs_np, acts, rews = np.empty((h, k, model.nq - 1 + model.nv)), [], np.empty((h, k))
    with torch.no_grad():
        std = log_std.exp()
        for t in range(h):
            obs_np[t] = [np.concatenate([env.qpos[1:], env.qvel]) for env in envs]
            a = mean(torch.from_numpy(obs_np[t]).to(dtype=dtype, device=log_std.device)) + std * noise[t]
            acts.append(a)
            ctrl = a.clamp(-1, 1).double().cpu().numpy()
            for i, env in enumerate(envs):
                x0 = env.qpos[0]
                env.ctrl[:] = ctrl[i]
                mujoco.mj_step(model, env, nstep=data.frame_skip)
                rews[t, i] = d * (env.qpos[0] - x0) / dt - data.ctrl_cost * float(ctrl[i] @ ctrl[i])
    obs, rewards = (torch.from_numpy(x).to(dtype=dtype, device=log_std.device).transpose(0, 1) for x in (obs_np, rews))
    return obs, torch.stack(acts, 1), rewards
