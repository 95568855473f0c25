"""Persistent evolution strategies (Vicol, Metz & Sohl-Dickstein, ICML 2021, "Unbiased Gradient Estimation in
Unrolled Computation Graphs with Persistent Evolution Strategies") and truncated backprop, over truncated unrolls:
the pure math and a worker's particles, with no Ray inside.

An inner run of T = W * K steps is cut into W truncations of K steps; meta-step t runs one truncation of every
particle. Pair i keeps two inner states (theta +/- sigma z) across truncations and the sum xi_i of the noise it
has seen since its last reset; with fitnesses L+/-_i of the truncation,

    g = sum_i xi_i (L+_i - L-_i) / (2 N sigma)     (xi in units of sigma: sum of the z's since the reset)

summed over a whole unroll at fixed theta, is an unbiased estimate of the gradient of the Gaussian-smoothed
full-unroll objective (Algorithm 2 of the paper). Truncated backprop (`tbptt`) differentiates only through the
current K steps from a detached state: cheap and biased towards short horizons, the paper's comparison.

Every particle's state is a pure function of (seed, particle, the meta-parameters published at each meta-step since
its last reset): its noise z(seed, step, particle) comes from es.noise, its inner task and initialisation from
(seed, particle, unroll index). Workers keep the states (nothing per inner step crosses the network); a worker that
has not got a particle's state at the step asked for (a restarted worker, another worker after a loss, a resumed
run) replays it from its last reset with the published history, bit for bit. With `stagger`, particle i's resets
fall at steps s where (s + i mod W) % W == 0 (and at 0), so the particles' truncations do not all start together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Protocol, Sequence

import torch

from metascale.algorithms import es
from metascale.algorithms.base import Params

Mode = Literal["pes", "tbptt"]


def offset(particle: int, truncations: int, stagger: bool) -> int:
    return particle % truncations if stagger else 0


def last_reset(step: int, particle: int, truncations: int, stagger: bool) -> int:
    """The meta-step at which the particle's current inner run started."""
    return max(0, step - (step + offset(particle, truncations, stagger)) % truncations)


def unroll_index(step: int, particle: int, truncations: int, stagger: bool) -> int:
    """Which of the particle's inner runs meta-step `step` belongs to (its task and initialisation are drawn by it)."""
    return (step + offset(particle, truncations, stagger)) // truncations


def accumulated_noise(theta: Params, seed: int, step: int, particle: int, truncations: int, stagger: bool) -> Params:
    """xi / sigma: the sum of the particle's noise draws from its last reset up to and including `step`."""
    total = {k: torch.zeros_like(v) for k, v in theta.items()}
    for s in range(last_reset(step, particle, truncations, stagger), step + 1):
        for k, z in es.noise(theta, seed, s, particle).items():
            total[k].add_(z)
    return total


def estimate(
    theta: Params,
    seed: int,
    step: int,
    rows: Sequence[tuple[int, float, float]],
    sigma: float,
    truncations: int,
    stagger: bool,
) -> Params:
    """The PES gradient estimate from the pairs' truncation losses (particle, L+, L-); the noise is regenerated."""
    grad = {k: torch.zeros_like(v) for k, v in theta.items()}
    for particle, plus, minus in rows:
        weight = (plus - minus) / (2 * len(rows) * sigma)
        for k, xi in accumulated_noise(theta, seed, step, particle, truncations, stagger).items():
            grad[k].add_(xi, alpha=weight)
    return grad


class Problem(Protocol):
    """An inner training problem: a fresh state for a key, and K steps of it under meta-parameters theta returning
    the new state and the truncation's loss (differentiable w.r.t. theta when grad mode is on)."""

    def fresh(self, key: tuple[int, ...], task: Any) -> Any: ...

    def train_steps(self, theta: Params, state: Any, task: Any, steps: int) -> tuple[Any, torch.Tensor]: ...


@dataclass(frozen=True)
class Schedule:
    seed: int
    truncations: int  # W: truncations per inner run
    length: int  # K: inner steps per truncation
    sigma: float
    stagger: bool


@dataclass
class _Held:
    next_step: int  # the meta-step whose truncation these states are ready to run
    states: list[Any]  # pes: [plus, minus]; tbptt: [state]
    task: Any


class Particles:
    """A worker's particles. `advance` runs one particle's truncation at `step` from the held state, or replays it
    from its last reset when the held one is not at `step` (or is missing)."""

    def __init__(self, problem: Problem, schedule: Schedule, mode: Mode):
        self.problem, self.s, self.mode = problem, schedule, mode
        self.held: dict[int, _Held] = {}
        self.replayed = 0  # truncations recomputed to recover states (what a lost worker costs)

    def advance(
        self, particle: int, step: int, theta_at: Callable[[int], Params], task_at: Callable[[int], Any]
    ) -> tuple[float, float] | tuple[float, Params]:
        """pes: (L+, L-) of the truncation; tbptt: (L, dL/dtheta through this truncation)."""
        s = self.s
        held = self.held.pop(particle, None)
        start = last_reset(step, particle, s.truncations, s.stagger)
        if held is None or held.next_step != step or start == step:  # at a reset the held state is the last run's
            unroll = unroll_index(step, particle, s.truncations, s.stagger)
            task = task_at(unroll)
            state = self.problem.fresh((s.seed, particle, unroll), task)
            held = _Held(start, [state, state] if self.mode == "pes" else [state], task)
            while held.next_step < step:
                with torch.no_grad():
                    self._truncation(particle, held, theta_at(held.next_step))
                self.replayed += 1
        if self.mode == "pes":
            with torch.no_grad():
                plus, minus = self._truncation(particle, held, theta_at(step))
            out: tuple[float, float] | tuple[float, Params] = (float(plus), float(minus))
        else:
            theta = {k: v.detach().requires_grad_(True) for k, v in theta_at(step).items()}
            [loss] = self._truncation(particle, held, theta)
            grads = torch.autograd.grad(loss, list(theta.values()), allow_unused=True)
            out = (
                float(loss.detach()),
                {k: g if g is not None else torch.zeros_like(theta[k]) for k, g in zip(theta, grads)},
            )
        self.held[particle] = held
        return out

    def _truncation(self, particle: int, held: _Held, theta: Params) -> list[torch.Tensor]:
        """Runs K steps of every state in `held` in place (states detached after) and returns their losses."""
        s = self.s
        if self.mode == "pes":
            eps = es.noise(theta, s.seed, held.next_step, particle)
            thetas = [es.perturb(theta, eps, s.sigma), es.perturb(theta, eps, -s.sigma)]
        else:
            thetas = [theta]
        losses, states = [], []
        for th, state in zip(thetas, held.states):
            new, loss = self.problem.train_steps(th, state, held.task, s.length)
            states.append(_detached(new))
            losses.append(loss)
        held.states = states
        held.next_step += 1
        return losses


def _detached(state: Any) -> Any:
    """The state with its tensors cut from any graph (the next truncation starts from values, as TBPTT must)."""
    if isinstance(state, torch.Tensor):
        return state.detach()
    if isinstance(state, dict):
        return {k: _detached(v) for k, v in state.items()}
    if hasattr(state, "__dataclass_fields__"):
        return type(state)(**{f: _detached(getattr(state, f)) for f in state.__dataclass_fields__})
    return state
