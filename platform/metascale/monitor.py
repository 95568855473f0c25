"""What a user watches: a W&B run (offline by default), a progress bar on a terminal, plain log lines otherwise.

The W&B run id is kept in checkpoints, so a resumed job continues the same run rather than starting a new one.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from tqdm import tqdm

from metascale.config import JobSpec


class Monitor:
    def __init__(self, spec: JobSpec, run_id: str | None, start_step: int):
        self.spec = spec
        self.every = spec.logging.every
        self.run = None
        wb = spec.logging.wandb
        if wb.mode != "disabled":
            import wandb

            directory = spec.path(wb.dir)
            os.makedirs(directory, exist_ok=True)
            self.run = wandb.init(
                project=wb.project,
                entity=wb.entity,
                name=spec.name,
                dir=directory,
                mode=wb.mode,
                id=run_id,
                resume="allow" if run_id else None,
                config=spec.model_dump(mode="json"),
                settings=wandb.Settings(silent=True, console="off"),
            )
        self.run_id = self.run.id if self.run else run_id
        tty = spec.logging.progress and sys.stderr.isatty()
        self.bar = tqdm(total=spec.outer.steps, initial=start_step, desc=spec.name, disable=not tty, file=sys.stderr)
        self.last = time.perf_counter()

    def step(self, step: int, metrics: dict[str, Any]) -> None:
        """`step` is the meta-step just finished (1-based count of steps done)."""
        if self.run:
            self.run.log(metrics, step=step)
        shown = {k: v for k, v in metrics.items() if k in ("train/loss", "train/accuracy", "eval/accuracy", "episodes_per_s")}
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

    def artifact(self, path: str, step: int) -> None:
        if self.run and os.path.exists(path):
            import wandb

            art = wandb.Artifact(f"{self.spec.name}-checkpoint", type="checkpoint", metadata={"step": step})
            art.add_dir(path) if os.path.isdir(path) else art.add_file(path)  # a checkpoint is a folder
            self.run.log_artifact(art)

    def close(self) -> None:
        self.bar.close()
        if self.run:
            self.run.finish()
