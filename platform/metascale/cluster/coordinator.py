"""The coordinator: owns the meta-parameters and the meta-optimiser, turns workers' summed meta-gradients into one
update, and snapshots everything a resumed job needs.

Aggregation sums the workers' results in slot-group order (never arrival order), so the update does not depend on
which worker finished first or which one recomputed a lost group: runs with and without faults end bit-identical.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import yaml

from metascale.algorithms import build_algorithm
from metascale.cluster.messages import NumpyParams, WorkResult
from metascale.cluster.replica import to_numpy
from metascale.cluster.optim import lr_at, make_optimizer, set_lr
from metascale.config import JobSpec
from metascale.data import output_dim
from metascale.errors import CheckpointError, MetascaleError
from metascale.models import build_model

log = logging.getLogger(__name__)


class NonFiniteError(MetascaleError):
    exit_code = 1


# The spec fields that decide the meta-parameters' names and shapes: what must agree between a checkpoint and a job.
SHAPE_FIELDS = ("model", "data.ways", "data.source", "algorithm.name", "algorithm.learned", "algorithm.mwn")


def check_compatible(coord: "Coordinator", state: dict[str, Any], what: str) -> None:
    """Refuses, in one line, a checkpoint whose meta-parameters do not fit this job's, naming the spec fields that
    differ from the spec recorded in the checkpoint (and otherwise the first parameters that differ)."""
    ours = {k: tuple(v.shape) for k, v in coord.params.items()}
    theirs = {k: tuple(v.shape) for k, v in state.get("params", {}).items()}
    if ours == theirs:
        return
    recorded = _flat(yaml.safe_load(state["spec"]) if isinstance(state.get("spec"), str) else {})
    fields = [
        f"{k} ({recorded.get(k)!r} in the checkpoint, {v!r} here)"
        for k, v in _flat(coord.spec.model_dump(mode="json")).items()
        if k.startswith(SHAPE_FIELDS) and recorded.get(k) != v
    ]
    if not fields:
        diff = sorted(set(ours) ^ set(theirs)) or sorted(k for k in ours if ours[k] != theirs[k])
        fields = [f"parameters {', '.join(diff[:3])}"]
    raise CheckpointError(
        f"{what}: the checkpoint does not fit this job's model: {'; '.join(fields[:4])}; use the "
        "spec the checkpoint was trained with (it is recorded in the checkpoint)"
    )


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


@dataclass
class StepResult:
    grads: dict[str, torch.Tensor]  # mean over the tasks that counted
    tasks: int
    metrics: dict[str, float]  # mean over tasks
    worker_s: dict[int, float]  # per-worker compute seconds (stragglers)
    data_s: float  # total seconds workers waited for task data
    nonfinite: list[tuple[int, int]] = field(default_factory=list)  # (slot, worker)
    peak_bytes: dict[int, int] = field(default_factory=dict)  # per-worker rise of peak resident memory


def aggregate(results: list[WorkResult]) -> StepResult:
    """Sum in item order, then divide by the total task count (a weighted mean when slot groups differ in size).

    The inputs are read-only object-store views (or a worker's live arrays, inline): the first sum or the division
    writes a new buffer and later steps work in place on it, one pass per input and no copies (bench scaling)."""
    tasks = sum(r.tasks for r in results)
    sums: dict[str, np.ndarray] = {}
    owned: set[str] = set()
    metrics: dict[str, float] = {}
    for r in results:
        for k, g in r.grads.items():
            if k not in sums:
                sums[k] = g
            elif k in owned:
                np.add(sums[k], g, out=sums[k])
            else:
                sums[k] = np.asarray(np.add(sums[k], g))  # asarray: numpy makes 0-d sums scalars (learned rates)
                owned.add(k)
        for k, v in r.metrics.items():
            metrics[k] = metrics.get(k, 0.0) + v
    denom = max(tasks, 1)
    for k, s in sums.items():
        sums[k] = np.asarray(np.divide(s, denom, out=s if k in owned else None))
    return StepResult(
        grads={k: torch.from_numpy(s) for k, s in sums.items()},
        tasks=tasks,
        metrics={k: v / denom for k, v in metrics.items()},
        worker_s={r.worker: r.compute_s for r in results},
        data_s=sum(r.data_s for r in results),
        nonfinite=[(s, r.worker) for r in results for s in r.nonfinite_slots],
        peak_bytes={r.worker: r.peak_bytes for r in results if r.peak_bytes is not None},
    )


class Coordinator:
    def __init__(self, spec: JobSpec):
        self.spec = spec
        torch.manual_seed(spec.seed)
        dtype = getattr(torch, spec.executor.dtype)
        model = build_model(spec.model, output_dim(spec.data)).to(dtype)
        self.algorithm = build_algorithm(spec.algorithm, model, spec.data)
        init = self.algorithm.init(dict(model.named_parameters()))
        # The model's own storage, not a copy: a second copy of a 1B-parameter model is 4 GB of host memory.
        self.params = {k: v.detach().requires_grad_(True) for k, v in init.items()}
        self.optimizer = make_optimizer(spec.outer, list(self.params.values()))
        self.step = 0  # the next meta-step to run
        self.skipped_steps = 0
        # Truncated unrolls (outer.estimator pes/tbptt): the meta-parameters published at each of the last W steps,
        # from which any worker replays a particle since its last reset (cluster/unrolled.py); saved in checkpoints.
        unrolled = spec.outer.estimator in ("pes", "tbptt")
        self.keep_history = spec.algorithm.inner.steps // spec.outer.pes.truncation if unrolled else 0
        self.history: dict[int, NumpyParams] = {}

    def init_from_file(self) -> int:
        """`model.init_from`'s weights into the meta-parameters (a fresh run; models/init_from.py): how many."""
        from metascale.models.init_from import load_init

        return load_init(self.algorithm.f.model, self.algorithm.model_params(self.params), self.spec.model)

    def published(self) -> NumpyParams:
        out = to_numpy(self.params)
        if self.keep_history:
            self.history[self.step] = {k: v.copy() for k, v in out.items()}  # the params change in place
            self.history = {s: p for s, p in self.history.items() if s > self.step - self.keep_history}
        return out

    def apply(self, result: StepResult, advance: bool = True) -> bool:
        """Steps the meta-optimiser with the aggregated meta-gradient; False when the policy skipped the step.
        `advance` False: a PPO epoch inside the step (cluster/estimators.py `epochs`), the step count stays."""
        policy = self.spec.executor.nonfinite
        if result.nonfinite:
            where = ", ".join(f"slot {s} on worker {w}" for s, w in result.nonfinite)
            if policy == "stop":
                raise NonFiniteError(f"non-finite meta-gradient at step {self.step}: {where} (executor.nonfinite=stop)")
            log.warning("step %d: non-finite meta-gradient from %s; policy %s", self.step, where, policy)
        if result.tasks == 0 or (result.nonfinite and policy == "skip_step"):
            self.skipped_steps += advance
            self.step += advance
            return False
        for k, p in self.params.items():
            p.grad = result.grads[k].to(p.dtype)
        if self.spec.outer.grad_clip:
            torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.spec.outer.grad_clip)
        set_lr(self.optimizer, lr_at(self.spec.outer, self.step))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += advance
        return True

    def snapshot(self) -> tuple[NumpyParams, dict[str, Any]]:
        """Copies of the meta-parameters and the optimiser state: what `restore` puts back (a PPO step's epochs
        change both before the step ends, and a step must apply whole or not at all)."""
        return {k: v.copy() for k, v in to_numpy(self.params).items()}, copy.deepcopy(self.optimizer.state_dict())

    def restore(self, snap: tuple[NumpyParams, dict[str, Any]]) -> None:
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(torch.from_numpy(snap[0][k]))
        self.optimizer.load_state_dict(snap[1])

    def model_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.algorithm.model_params(self.params).items()}

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "params": {k: v.detach().clone() for k, v in self.params.items()},
            "optimizer": self.optimizer.state_dict(),
            # Tasks are pure in (seed, step, slot), so the data position is `step`; torch's RNG is all else there is.
            "rng": {"torch": torch.get_rng_state()},
            **(
                {"history": {str(s): {k: torch.from_numpy(v) for k, v in p.items()} for s, p in self.history.items()}}
                if self.keep_history
                else {}
            ),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = set(self.params) ^ set(state["params"])
        if missing:
            raise MetascaleError(
                f"checkpoint does not match the job's model (parameters differ: {sorted(missing)[:5]})"
            )
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(state["params"][k])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        torch.set_rng_state(state["rng"]["torch"])
        self.history = {int(s): {k: v.numpy() for k, v in p.items()} for s, p in state.get("history", {}).items()}
