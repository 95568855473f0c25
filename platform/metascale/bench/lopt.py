"""`metascale bench lopt`: a meta-trained learned optimiser against Adam with a tuned learning rate, each training
the same fresh MLPs (the job's model, the same initialisations) on the same held-out episodes for the same number of
steps. Adam's learning rate is tuned on validation-split episodes, by the mean training loss along the run (the
objective the learned optimiser was meta-trained on); the comparison runs on the test split (held-out classes)."""

from __future__ import annotations

from typing import Sequence

import torch

from metascale.algorithms import build_algorithm
from metascale.algorithms.lopt import InnerState, LearnedOptimizer
from metascale.config import JobSpec
from metascale.data import output_dim
from metascale.data.tasks import Task, TaskSources, held_out
from metascale.models import build_model

LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)


def adam_run(
    alg: LearnedOptimizer, state: InnerState, task: Task, lr: float, steps: int
) -> tuple[list[float], InnerState]:
    """Full-batch Adam on the support set: the training loss after each step, and the final weights."""
    params = {k: v.detach().clone().requires_grad_(True) for k, v in state.params.items()}
    opt = torch.optim.Adam(list(params.values()), lr=lr)
    curve = []
    for _ in range(steps):
        opt.zero_grad()
        alg.loss(params, task.support_x, task.support_y).backward()
        opt.step()
        with torch.no_grad():
            curve.append(float(alg.loss(params, task.support_x, task.support_y)))
    return curve, InnerState(params, state.momenta, steps)


def lopt_run(
    alg: LearnedOptimizer, theta: dict, state: InnerState, task: Task, steps: int
) -> tuple[list[float], InnerState]:
    curve = []
    with torch.no_grad():
        for _ in range(steps):
            state, loss = alg.train_steps(theta, state, task, 1)
            curve.append(float(loss))
    return curve, state


def _accuracy(alg: LearnedOptimizer, state: InnerState, task: Task) -> float:
    with torch.no_grad():
        out = alg.f(state.params, task.query_x.flatten(1))
    return float((out.argmax(-1) == task.query_y).float().mean())


def _summary(curves: list[list[float]], accs: list[float]) -> dict[str, float]:
    n = len(curves)
    return {
        "mean_train_loss": sum(sum(c) / len(c) for c in curves) / n,
        "final_train_loss": sum(c[-1] for c in curves) / n,
        "query_accuracy": sum(accs) / n,
    }


def run(spec: JobSpec, theta: dict[str, torch.Tensor], episodes: int = 50, lrs: Sequence[float] = LRS) -> dict:
    """The figures: tuned Adam's lr, and per optimiser the mean/final training loss and query accuracy on `episodes`
    held-out test episodes after `algorithm.inner.steps` steps, and how many steps Adam needs to match the learned
    optimiser's final training loss (mean curve; None: not within the steps)."""
    torch.manual_seed(spec.seed)
    dtype = getattr(torch, spec.executor.dtype)
    alg = build_algorithm(spec.algorithm, build_model(spec.model, output_dim(spec.data)).to(dtype))
    assert isinstance(alg, LearnedOptimizer)
    theta = {k: v.to(dtype) for k, v in theta.items()}
    steps, sources = spec.algorithm.inner.steps, TaskSources(spec.data, spec.seed)
    tasks = {s: held_out(sources(s), range(episodes)).to("cpu", dtype).tasks() for s in ("val", "test")}

    def inits(split: str) -> list[InnerState]:
        return [alg.fresh((spec.seed, 10**6 + i, split == "test"), t) for i, t in enumerate(tasks[split])]

    tuning = {lr: sum(sum(adam_run(alg, s, t, lr, steps)[0]) for s, t in zip(inits("val"), tasks["val"])) for lr in lrs}
    best = min(tuning, key=tuning.__getitem__)
    out: dict = {"adam_lr": best, "adam_lr_grid": list(lrs), "steps": steps, "episodes": episodes}
    curves: dict[str, list[list[float]]] = {"adam": [], "lopt": []}
    accs: dict[str, list[float]] = {"adam": [], "lopt": []}
    for state, task in zip(inits("test"), tasks["test"]):
        for name, (curve, final) in (
            ("adam", adam_run(alg, state, task, best, steps)),
            ("lopt", lopt_run(alg, theta, state, task, steps)),
        ):
            curves[name].append(curve)
            accs[name].append(_accuracy(alg, final, task))
    for name in curves:
        out |= {f"{name}_{k}": v for k, v in _summary(curves[name], accs[name]).items()}
    adam_mean = [sum(c[i] for c in curves["adam"]) / episodes for i in range(steps)]
    out["adam_steps_to_lopt_final_loss"] = next(
        (i + 1 for i, v in enumerate(adam_mean) if v <= out["lopt_final_train_loss"]), None
    )
    return out


def from_checkpoint(job: str, episodes: int, overrides: Sequence[str] = (), path: str | None = None) -> dict:
    """`run` with the meta-parameters of the job's newest checkpoint, or of `path` (one checkpoint, e.g. an earlier
    step folder of a run still going, as `eval --checkpoint` takes); one-line errors for a job that is not a learned
    optimiser's or has no checkpoint yet."""
    from metascale.cluster import checkpoint
    from metascale.config import load_spec
    from metascale.errors import CheckpointError, SpecError

    spec = load_spec(job, list(overrides))
    if spec.algorithm.name != "lopt":
        raise SpecError(f"{job}: bench lopt compares a learned optimiser: algorithm.name must be 'lopt'")
    found = checkpoint.resolve(path) if path is not None else checkpoint.load_latest(spec.path(spec.checkpoint.dir))
    if found is None:
        raise CheckpointError(f"no checkpoint in {spec.path(spec.checkpoint.dir)}: run `metascale run {job}` first")
    return {"checkpoint_step": found[0], **run(spec, found[1]["params"], episodes)}
