"""`metascale bench dg`: MLDG against pooled ERM over several seeds and held-out domains (leave-one-domain-out).

One evaluation's 95% interval (metascale run's final/accuracy_ci95) is over slices of the target's test images of
one trained model: it measures test-sample noise, not how much the result moves with the training seed. This
bench trains each (method, held-out domain, seed) with the real training loop (train.py, checkpoints in a temporary
folder) and reports, per method and domain, the mean and standard error over seeds, and the paired difference
MLDG - ERM (same seed: same rendered images, same initialisation). Beside the target's accuracy it reports the
source domains' held-out images (the val split), the only figure a model or hyperparameter may be chosen by
without looking at the target. Each run is appended to `--out` as one JSON line when it ends."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Sequence

METHODS = ("mldg", "erm_pooled")


def _mean_se(values: Sequence[float]) -> dict[str, float]:
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else float("nan")
    return {"mean": mean, "se": math.sqrt(var / n), "n": n}


def run_one(job: str, overrides: Sequence[str], method: str, target: str, seed: int, root: str) -> dict:
    """Trains one model, scores it on the held-out target (test split) and on the sources' held-out images (val)."""
    from metascale.config import load_spec
    from metascale.evaluate import evaluate_checkpoint
    from metascale.train import train

    name = f"dg-{method}-{target}-s{seed}"
    sets = [
        *overrides,
        f"name={name}",
        f"seed={seed}",
        f"algorithm.name={method}",
        f"data.target={target}",
        f"checkpoint.dir={root}/{name}",
        "checkpoint.every=0",
        "eval.every=0",
        "logging.wandb.mode=disabled",
    ]
    spec = load_spec(job, sets)
    result = train(spec)
    if result["status"] != "finished":  # stopped by a signal: no final figure to report
        raise RuntimeError(f"{name}: training {result['status']} at step {result['step']}; the bench stops here")
    val_spec = load_spec(job, [*sets, "eval.split=val"])
    d = val_spec.data
    if d.source == "spurious":  # the sources' held-out examples
        val_slices = len(d.domains) * d.test_per_domain // d.eval_batch
    else:
        val_slices = len([x for x in d.domains if x != d.target]) * d.ways * d.test_per_class // d.eval_batch
    val = evaluate_checkpoint(val_spec, None, val_slices)
    return {
        "method": method,
        "target": target,
        "seed": seed,
        "steps": result["step"],
        "test_accuracy": result["final/accuracy"],
        "test_episodes": result["final/episodes"],
        "val_accuracy": val["val/accuracy"],
        "val_episodes": val["val/episodes"],
    }


def summarise(runs: Sequence[dict]) -> dict:
    """Per (target, method): mean +- standard error over seeds; per target and over all targets: the paired
    difference MLDG - ERM (only seeds that both methods ran)."""
    out: dict = {"per_target": {}, "paired_difference": {}}
    targets = sorted({r["target"] for r in runs})
    by = {(r["target"], r["method"], r["seed"]): r for r in runs}
    lodo: dict[str, list[float]] = {}
    for t in targets:
        out["per_target"][t] = {}
        for m in METHODS:
            rs = [r for r in runs if r["target"] == t and r["method"] == m]
            if rs:
                out["per_target"][t][m] = {
                    "test": _mean_se([r["test_accuracy"] for r in rs]),
                    "val": _mean_se([r["val_accuracy"] for r in rs]),
                    "seeds": [r["seed"] for r in rs],
                }
        seeds = sorted({s for (tt, m, s) in by if tt == t and all((t, mm, s) in by for mm in METHODS)})
        if seeds:
            diffs = [by[(t, "mldg", s)]["test_accuracy"] - by[(t, "erm_pooled", s)]["test_accuracy"] for s in seeds]
            out["paired_difference"][t] = _mean_se(diffs)
            for s, dv in zip(seeds, diffs):
                lodo.setdefault(str(s), []).append(dv)
    # Leave-one-domain-out average per seed (over the targets that seed has both methods for), then over seeds.
    full = [sum(v) / len(v) for v in lodo.values() if len(v) == len(targets)]
    if full:
        out["paired_difference"]["average_over_targets"] = _mean_se(full)
    return out


def run(
    job: str,
    targets: Sequence[str],
    seeds: Sequence[int],
    methods: Sequence[str],
    overrides: Sequence[str],
    out: str | None,
) -> dict:
    runs = []
    with tempfile.TemporaryDirectory(prefix="metascale-dg-") as root:
        for target in targets:
            for seed in seeds:
                for method in methods:
                    r = run_one(job, overrides, method, target, seed, root)
                    runs.append(r)
                    if out:
                        with Path(out).open("a") as f:
                            f.write(json.dumps({**r, "overrides": list(overrides)}) + "\n")
    return {"runs": runs, **summarise(runs)}
