"""The meta learning-rate schedule (cluster/optim.py): its shape, and that the coordinator steps with it."""

from __future__ import annotations

import math

import pytest
import torch

from metascale.cluster.coordinator import Coordinator, StepResult
from metascale.cluster.optim import lr_at
from metascale.config import OuterLoopSpec, parse_spec


def rates(**outer) -> list[float]:
    spec = OuterLoopSpec(**outer)
    return [lr_at(spec, step) for step in range(spec.steps)]


def test_warm_up_then_constant_then_cosine_over_the_last_steps():
    got = rates(lr=2.0, steps=10, schedule={"warmup_steps": 2, "decay": "cosine", "decay_steps": 4})
    cosine = [1 + math.cos(math.pi * i / 4) for i in range(4)]  # 2 * (1 + cos) / 2
    assert got == pytest.approx([1.0, 2.0, 2.0, 2.0, 2.0, 2.0, *cosine])


def test_linear_decay_to_a_floor_starts_after_the_warm_up_when_decay_steps_is_unset():
    got = rates(lr=1.0, steps=6, schedule={"warmup_steps": 2, "decay": "linear", "final_ratio": 0.2})
    assert got == pytest.approx([0.5, 1.0, 1.0, 0.8, 0.6, 0.4])


def test_no_schedule_is_the_constant_rate():
    assert rates(lr=0.003, steps=5) == [0.003] * 5


def _coordinator(lr: float, **schedule) -> Coordinator:
    return Coordinator(
        parse_spec(
            {
                "model": {"name": "conv4", "hidden": 4},
                "data": {"source": "synthetic", "ways": 2, "classes": 4},
                "outer": {"optimizer": "sgd", "lr": lr, "steps": 8, "schedule": schedule},
            }
        )
    )


def _step(coord: Coordinator, grad: float) -> dict[str, torch.Tensor]:
    before = {k: v.detach().clone() for k, v in coord.params.items()}
    coord.apply(StepResult({k: torch.full_like(v, grad) for k, v in before.items()}, 1, {}, {0: 0.0}, 0.0))
    return {k: before[k] - v.detach() for k, v in coord.params.items()}


def test_a_resumed_coordinator_steps_at_its_specs_rate_not_the_checkpoints():
    """SGD's step is rate x gradient, so each step shows the rate used. The checkpoint's optimiser state carries the
    old rate (0.01); the resumed job's spec asks for 0.5 decaying linearly over its last 4 of 8 steps."""
    old = _coordinator(0.01)
    for _ in range(3):
        assert all(torch.allclose(d, torch.full_like(d, 0.01)) for d in _step(old, 1.0).values())
    new = _coordinator(0.5, decay="linear", decay_steps=4)
    new.load_state_dict(old.state_dict())
    for step in range(3, 8):
        want = lr_at(new.spec.outer, step)
        assert all(torch.allclose(d, torch.full_like(d, want)) for d in _step(new, 1.0).values()), step
    assert [lr_at(new.spec.outer, s) for s in range(3, 8)] == pytest.approx([0.5, 0.5, 0.375, 0.25, 0.125])
