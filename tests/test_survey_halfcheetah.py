"""MAML-RL on the HalfCheetah direction tasks (MuJoCo): the batched rollout against a plain one-environment MuJoCo
loop with the direction reward and qpos[1:] + qvel observation, rewards that flip with the direction, task draws that are a pure
function of (seed, split, step, slot), one short meta-training run through the real environment, and the clean
refusal when mujoco is absent. Skipped, with the reason, where the `rl` extra is not installed."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from metascale.algorithms import build_algorithm
from metascale.cluster.coordinator import Coordinator
from metascale.cluster.estimators import backprop
from metascale.cluster.pool import InlinePool
from metascale.config import AlgorithmSpec, HalfCheetahDirData, InnerLoopSpec, MLPSpec, load_spec, parse_spec
from metascale.data.halfcheetah import HalfCheetahDirTasks, cheetah_model, rollout
from metascale.errors import SpecError
from metascale.evaluate import evaluate
from metascale.extras import available
from metascale.models import build_model

needs_mujoco = pytest.mark.skipif(not available("mujoco"), reason="the `rl` extra (mujoco) is not installed")


def _policy(seed=0):
    torch.manual_seed(seed)
    return build_model(MLPSpec(in_features=17, hidden=[16]), 6).double()


def _rollout(data, direction, seed=0):
    with torch.no_grad():
        log_std = torch.full((6,), -0.5, dtype=torch.float64)
        return rollout(_policy(), log_std, torch.tensor([[direction]]), data, torch.Generator().manual_seed(seed))


@needs_mujoco
def test_the_batched_rollout_matches_a_one_environment_mujoco_loop():
    """From the rest pose (reset_noise 0), replaying each trajectory's recorded actions in a fresh MjData with
    the direction reward (d * dx / dt - ctrl_cost * ||clip(a)||^2, dt = frame_skip x 0.01) and observation
    (qpos[1:], qvel) gives the same observations and rewards."""
    data = HalfCheetahDirData(horizon=15, rollouts=3, reset_noise=0.0)
    obs, actions, rewards = _rollout(data, -1.0)
    assert obs.shape == (3, 15, 17) and actions.shape == (3, 15, 6) and rewards.shape == (3, 15)
    mujoco, model = sys.modules["mujoco"], cheetah_model()
    assert model.opt.timestep == 0.01
    for k in range(3):
        env = mujoco.MjData(model)
        mujoco.mj_forward(model, env)
        for t in range(15):
            np.testing.assert_allclose(np.concatenate([env.qpos[1:], env.qvel]), obs[k, t].numpy(), atol=1e-12)
            a = actions[k, t].clamp(-1, 1).numpy()
            x0 = env.qpos[0]
            for _ in range(5):
                env.ctrl[:] = a
                mujoco.mj_step(model, env)
            want = -1.0 * (env.qpos[0] - x0) / 0.05 - 0.05 * float(np.sum(a**2))
            assert abs(float(rewards[k, t]) - want) < 1e-9
    assert float(actions.abs().max()) > 1  # the clip was exercised


@needs_mujoco
def test_rewards_flip_with_the_direction_and_nothing_else_does():
    """Same noise, opposite directions: the same trajectories (the direction is not observed), and per step
    r(+1) + r(-1) = -2 x the control cost, r(+1) - r(-1) = 2 x the forward velocity (non-zero)."""
    data = HalfCheetahDirData(horizon=20, rollouts=4)
    fwd, bwd = _rollout(data, 1.0, seed=3), _rollout(data, -1.0, seed=3)
    assert torch.equal(fwd[0], bwd[0]) and torch.equal(fwd[1], bwd[1])
    ctrl = data.ctrl_cost * (fwd[1].clamp(-1, 1) ** 2).sum(-1)
    torch.testing.assert_close(fwd[2] + bwd[2], -2 * ctrl, rtol=0, atol=1e-9)
    assert float((fwd[2] - bwd[2]).abs().min()) > 0


@needs_mujoco
def test_task_draws_are_a_pure_function_of_seed_split_step_and_slot():
    data = HalfCheetahDirData()
    a, b = HalfCheetahDirTasks(data, "train", 1), HalfCheetahDirTasks(data, "train", 1)
    assert all(torch.equal(x, y) for x, y in zip(a.task(4, 2).__dict__.values(), b.task(4, 2).__dict__.values()))
    dirs = torch.stack([a.task(s, k).support_x.reshape(()) for s in range(10) for k in range(10)])
    assert set(dirs.tolist()) == {-1.0, 1.0} and 30 < int((dirs > 0).sum()) < 70
    seeds = {int(a.task(s, k).support_y[0]) for s in range(10) for k in range(10)}
    assert len(seeds) == 100  # every task its own noise
    test = HalfCheetahDirTasks(data, "test", 1)
    assert [int(test.task(0, k).support_y[0]) for k in range(5)] != [int(a.task(0, k).support_y[0]) for k in range(5)]


@needs_mujoco
def test_the_maml_rl_policy_is_gaussian_over_the_six_torques():
    data = HalfCheetahDirData(horizon=3, rollouts=2)
    model = _policy()
    alg = build_algorithm(AlgorithmSpec(name="maml_rl", inner=InnerLoopSpec(lr=0.1, steps=1)), model, data)
    meta = alg.init(dict(model.named_parameters()))
    assert meta["policy_log_std"].shape == (6,)


def _job(tmp_path, **kw):
    raw = {
        "name": "cheetah",
        "seed": 0,
        "model": {"name": "mlp", "in_features": 17, "hidden": [32, 32]},
        "data": {"source": "halfcheetah_dir", "horizon": 20, "rollouts": 5},
        "algorithm": {"name": "maml_rl", "inner": {"steps": 1, "lr": 0.1}},
        "outer": {"optimizer": "adam", "lr": 0.01, "meta_batch": 4, "steps": 2},
        "eval": {"every": 0, "episodes": 4, "final_episodes": 4},
        "checkpoint": {"dir": str(tmp_path / "ckpt"), "every": 0},
        "logging": {"wandb": {"mode": "disabled"}, "progress": False},
        "cluster": {"address": "inline"},
    }
    raw.update(kw)
    return parse_spec(raw)


@needs_mujoco
def test_two_meta_steps_through_the_real_environment_move_the_policy_and_report_both_returns(tmp_path):
    spec = _job(tmp_path)
    coord, pool = Coordinator(spec), InlinePool(spec)
    before = {k: np.copy(v) for k, v in coord.published().items()}
    for step in range(spec.outer.steps):
        coord.apply(backprop(spec, pool, step, coord.published()))
    after = coord.published()
    assert all(np.isfinite(v).all() for v in after.values())
    assert all(not np.array_equal(before[k], after[k]) for k in ("body.0.weight", "policy_log_std")), "no update"
    m = evaluate(pool, after, spec, spec.eval.episodes, "eval")
    assert (
        np.isfinite(m["eval/return"]) and np.isfinite(m["eval/return_pre"]) and m["eval/return"] != m["eval/return_pre"]
    )


@needs_mujoco
def test_the_halfcheetah_job_validates():
    spec = load_spec("jobs/halfcheetah-dir-maml-rl.yaml")
    assert spec.algorithm.name == "maml_rl" and spec.data.source == "halfcheetah_dir" and spec.model.in_features == 17


@needs_mujoco
@pytest.mark.parametrize(
    "patch, reason",
    [
        ({"model": {"name": "mlp", "in_features": 2}}, "17-dimensional observation"),
        ({"algorithm": {"name": "maml"}}, "'maml_rl' learns from rollouts"),
        ({"data": {"source": "halfcheetah_dir", "frame_skip": 0}}, "frame_skip"),
    ],
)
def test_meaningless_halfcheetah_combinations_are_refused_with_a_reason(tmp_path, patch, reason):
    with pytest.raises(SpecError, match=reason):
        _job(tmp_path, **patch)


def test_without_mujoco_the_job_is_refused_with_one_line_naming_the_extra(cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "mujoco", None)
    code, out, err = cli("validate", "jobs/halfcheetah-dir-maml-rl.yaml")
    assert code == 2 and out == "", (code, out, err)
    problems = err.strip().splitlines()[1:]
    assert problems == [
        "  data: source 'halfcheetah_dir' needs mujoco, which is not installed: pip install 'metascale[rl]'"
    ]
