"""What a user watches: a W&B run, a progress bar on a terminal, plain log lines otherwise.

The W&B run id is kept in checkpoints, so a resumed job continues the same run rather than starting a new one.
`logging.wandb.mode: auto` (the default) is online when WANDB_API_KEY is set and offline otherwise (WANDB_MODE, when
set, decides instead): a laptop without a key never tries the network, and a RayJob, which passes the key from a
Secret, logs online. The run's config is the resolved spec plus `metascale: {version, job_id, cluster_address}`.

Checkpoints become W&B artifacts of type `model`, named `model-<run id>` (one collection per run, resumed sessions
included), under `logging.wandb.log_checkpoints`: `final` (the default) uploads the run's last checkpoint once the run
ends, whatever ended it; `all` uploads each one as it is written; `none` uploads nothing. Each version is tagged
`latest`; the one whose held-out evaluation is the best so far is also tagged `best` (see `score`).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from typing import Any

from tqdm import tqdm

from metascale import version
from metascale.config import JobSpec

log = logging.getLogger(__name__)
JOB_ID_ENV = "METASCALE_JOB_ID"  # set in a submitted job's environment by `metascale submit`; absent for a local run
BEST_KEY = "model/best_score"  # in the run's summary: a resumed online run knows the best of its earlier sessions


def resolve_mode(mode: str, env: Any = os.environ) -> str:
    """`auto` -> 'online' when WANDB_API_KEY is set, else 'offline'; a set WANDB_MODE wins over the key."""
    if mode != "auto":
        return mode
    forced = env.get("WANDB_MODE", "").strip().lower()
    if forced in ("online", "offline", "disabled"):
        return forced
    if forced == "dryrun":
        return "offline"
    return "online" if env.get("WANDB_API_KEY") else "offline"


def score(metrics: dict[str, Any], prefix: str) -> tuple[str, float] | None:
    """How `best` is chosen: the held-out accuracy of the evaluation `prefix` (eval/accuracy during the run,
    final/accuracy at the end), higher is better; for regression, which has no accuracy, minus the loss. None when the
    metrics hold no such evaluation, or it is not a finite number."""
    for key, sign in ((f"{prefix}/accuracy", 1.0), (f"{prefix}/loss", -1.0)):
        value = metrics.get(key)
        if isinstance(value, (int, float)):
            return (key, sign * float(value)) if math.isfinite(value) else None
    return None


def cluster_address(spec: JobSpec) -> str:
    """The Ray cluster the run's workers are on: its GCS address once Ray is up, else the spec's `cluster.address`."""
    ray = sys.modules.get("ray")
    if ray is not None and spec.cluster.address != "inline":
        try:
            if ray.is_initialized():
                return ray.get_runtime_context().gcs_address
        except Exception:  # noqa: BLE001 - only informative: never fail a run over it
            pass
    return spec.cluster.address


class Monitor:
    def __init__(self, spec: JobSpec, run_id: str | None, start_step: int):
        self.spec = spec
        self.every = spec.logging.every
        self.run = None
        wb = spec.logging.wandb
        self.mode = resolve_mode(wb.mode)
        self.scores: dict[int, tuple[str, float]] = {}  # step -> score of the parameters after that step
        self.pending: tuple[str, int] | None = None  # the checkpoint to upload when the run ends
        self.best: float | None = None
        if self.mode != "disabled":
            import wandb

            directory = spec.path(wb.dir)
            os.makedirs(directory, exist_ok=True)
            config = spec.model_dump(mode="json")
            config["metascale"] = {
                "version": version(),
                "job_id": os.environ.get(JOB_ID_ENV) or None,
                "cluster_address": cluster_address(spec),
            }
            self.run = wandb.init(
                project=wb.project,
                entity=wb.entity,
                name=spec.name,
                group=wb.group,
                tags=list(wb.tags) or None,
                notes=wb.notes,
                job_type=wb.job_type,
                dir=directory,
                mode=self.mode,
                id=run_id,
                resume="allow" if run_id else None,
                config=config,
                settings=wandb.Settings(silent=True, console="off"),
            )
            if self.mode == "online":
                print(f"wandb: run {self.run.url}", file=sys.stderr, flush=True)
                if run_id:
                    previous = self.run.summary.get(BEST_KEY)
                    self.best = float(previous) if isinstance(previous, (int, float)) else None
        self.run_id = self.run.id if self.run else run_id
        tty = spec.logging.progress and sys.stderr.isatty()
        self.bar = tqdm(total=spec.outer.steps, initial=start_step, desc=spec.name, disable=not tty, file=sys.stderr)
        self.last = time.perf_counter()

    def step(self, step: int, metrics: dict[str, Any]) -> None:
        """`step` is the meta-step just finished (1-based count of steps done)."""
        if self.run:
            self.run.log(metrics, step=step)
        found = score(metrics, "eval")
        if found:
            self.scores[step] = found
        shown = {
            k: v for k, v in metrics.items() if k in ("train/loss", "train/accuracy", "eval/accuracy", "episodes_per_s")
        }
        if not self.bar.disable:
            self.bar.set_postfix({k.replace("train/", ""): f"{v:.4g}" for k, v in shown.items()}, refresh=False)
            self.bar.update(step - self.bar.n)
        elif step % self.every == 0 or step == self.spec.outer.steps:
            body = " ".join(f"{k.replace('train/', '')} {v:.4g}" for k, v in shown.items())
            print(f"step {step}/{self.spec.outer.steps} {body}", flush=True)

    def summary(self, metrics: dict[str, Any]) -> None:
        line = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
        tqdm.write(line, file=sys.stderr if not self.bar.disable else sys.stdout)
        if self.run:
            self.run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
            for k, v in metrics.items():
                self.run.summary[k] = v
        found = score(metrics, "final")
        if found and self.pending:  # the final evaluation is of the last checkpoint's parameters
            self.scores[self.pending[1]] = found

    def artifact(self, path: str, step: int) -> None:
        """Called after each checkpoint is written. `path` is the checkpoint, a file or a directory. The last step's
        checkpoint (and, under `final`, every one: the next replaces it) waits for the run's end, so that the final
        evaluation can score it."""
        policy = self.spec.logging.wandb.log_checkpoints
        if not self.run or policy == "none":
            return
        if policy == "all" and step < self.spec.outer.steps:
            self._upload(path, step)
        else:
            self.pending = (path, step)

    def _upload(self, path: str, step: int) -> None:
        import wandb

        if not os.path.exists(path):
            log.warning("checkpoint %s is not a local path: not logged to W&B", path)
            return
        found = self.scores.get(step)
        best = found is not None and (self.best is None or found[1] > self.best)
        metadata: dict[str, Any] = {"step": step, "job": self.spec.name, "job_id": os.environ.get(JOB_ID_ENV) or None}
        if found:
            metadata.update(metric=found[0], score=found[1])
        art = wandb.Artifact(f"model-{self.run.id}", type="model", metadata=metadata)
        name = os.path.basename(os.path.normpath(path))
        if os.path.isdir(path):  # a checkpoint directory (tensors + manifest): its files under its own name
            for root, _, files in os.walk(path):
                for f in sorted(files):
                    full = os.path.join(root, f)
                    art.add_file(full, name=f"{name}/{os.path.relpath(full, path)}")
        else:
            art.add_file(path, name=name)
        self.run.log_artifact(art, aliases=["latest", "best"] if best else ["latest"])
        if best:
            self.best = found[1]
            self.run.summary[BEST_KEY] = found[1]
            self.run.summary["model/best_step"] = step

    def close(self) -> None:
        self.bar.close()
        if self.run:
            if self.pending:
                try:
                    self._upload(*self.pending)
                except Exception as e:  # noqa: BLE001 - the checkpoint is on disk; the upload is a copy of it
                    log.warning("logging checkpoint %s to W&B failed: %s", self.pending[0], e)
                self.pending = None
            self.run.finish()
            if self.mode == "offline":
                where = self.run.settings.sync_dir
                print(f"wandb: offline run in {where}; upload it with: wandb sync {where}", file=sys.stderr, flush=True)
