"""`metascale bench ...`: each benchmark measures metascale against a baseline in the same run."""

from __future__ import annotations

import json
from enum import Enum

import typer

bench_app = typer.Typer(help="Benchmarks: each prints one JSON object as its last line.", no_args_is_help=True)


class Device(str, Enum):
    cpu = "cpu"
    cuda = "cuda"


def _need_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        raise typer.BadParameter("no CUDA device is visible to torch here", param_hint="--device")


def emit(result: dict) -> None:
    """The contract of every benchmark: the last line of stdout is one JSON object."""
    typer.echo(json.dumps(result, sort_keys=True))


@bench_app.command(name="inner-loop")
def inner_loop(
    meta_batch: int = typer.Option(32, min=1, help="Tasks per meta-step."),
    repeats: int = typer.Option(3, min=1, help="Timed repeats per configuration (best of, interleaved)."),
    threads: int = typer.Option(2, min=1, help="Thread budget shared by both sides (metascale: that many workers)."),
    memory_steps: int = typer.Option(10, min=1, help="Inner steps for the checkpointing memory comparison."),
    device: Device = typer.Option(Device.cpu, help="cuda: batched tasks vs the baseline on one GPU."),
) -> None:
    """MAML meta-steps/s vs a learn2learn-style per-task baseline; peak memory with vs without checkpointing."""
    from metascale.bench import inner_loop

    if device is Device.cuda:
        _need_cuda()
        emit(inner_loop.on_gpu(meta_batch, 1, repeats, memory_steps))
    else:
        emit(inner_loop.run(meta_batch=meta_batch, repeats=repeats, threads=threads, memory_steps=memory_steps))


@bench_app.command(name="data")
def data(
    root: str = typer.Option("data/glyphs", help="Where the glyph set is (or gets) prepared."),
    episodes: int = typer.Option(6400, min=64, help="Episodes to draw from shards (per measurement)."),
    meta_batch: int = typer.Option(32, min=1, help="Episodes per meta-batch (one loader item)."),
    workers: int = typer.Option(2, min=0, help="Loader worker processes."),
    classes: int = typer.Option(1623, min=20, help="Glyph classes (the set the README's job uses)."),
    repeats: int = typer.Option(3, min=1, help="Rounds (loader, in-process, baseline in turn); best of each."),
    layout_episodes: int = typer.Option(1280, min=64, help="Episodes per per-class vs per-sample shard measurement."),
    rgb: bool = typer.Option(
        False,
        "--rgb",
        help="Augmented 5-way 5-shot 15-query RGB 84x84 episodes instead "
        "(a packed set of --classes classes is made in a temporary folder; --root unused).",
    ),
) -> None:
    """Episodes/s from task shards vs a per-image in-memory sampler (5-way 1-shot 15-query, 28x28), and the same
    episodes from per-class vs per-sample (standard WebDataset) shards of the same images; with --rgb, augmented RGB
    84x84 episodes vs a per-image PIL pipeline and a ResNet-12 MAML meta-step."""
    if rgb:
        from metascale.bench.data_rgb import run as run_rgb

        emit(run_rgb(episodes, meta_batch, workers, classes, repeats))
        return
    import tempfile
    from pathlib import Path

    from metascale.bench import data_layouts
    from metascale.bench.data import run
    from metascale.data.glyphs import GlyphSetSpec, prepare_glyphs

    result = run(root, episodes, meta_batch, workers, classes, repeats)
    set_dir = str(prepare_glyphs(root, GlyphSetSpec(28, classes), progress=False))
    with tempfile.TemporaryDirectory(prefix="metascale-bench-layouts-") as work:
        result |= data_layouts.run(set_dir, Path(work), layout_episodes, meta_batch, repeats)
    emit(result)


@bench_app.command(name="es")
def es(pairs_per_worker: int = typer.Option(4, min=1, help="Antithetic pairs one ES worker scores per step.")) -> None:
    """Bytes an ES worker sends per step (10M-parameter model) vs backprop; iMAML peak memory at 20 vs 5 steps."""
    from metascale.bench.es import run

    emit(run(pairs_per_worker))


@bench_app.command(name="lopt")
def lopt(
    job: str = typer.Argument(..., help="The learned optimiser's job spec (algorithm lopt), already run."),
    episodes: int = typer.Option(50, min=1, help="Held-out test episodes (and validation episodes to tune Adam)."),
    overrides: list[str] = typer.Option([], "--set", help="Spec overrides, as for metascale run."),
    checkpoint: str | None = typer.Option(None, help="One checkpoint (a step folder) instead of the job's newest."),
) -> None:
    """The job's meta-trained learned optimiser vs Adam with its lr tuned on validation episodes: the same fresh MLPs
    trained on held-out classes for the same steps (training loss, query accuracy)."""
    from metascale.bench.lopt import from_checkpoint

    emit(from_checkpoint(job, episodes, overrides, checkpoint))


@bench_app.command(name="scaling")
def scaling(
    sizes: str = typer.Option("0.1M,10M,100M", help="Model sizes to measure (comma-separated: 0.1M, 10M, 100M)."),
    tasks_per_worker: int = typer.Option(8, min=1, help="Tasks each worker runs per meta-step (weak scaling)."),
    steps: int = typer.Option(2, min=1, help="Measured steps per configuration (best of; after one warm-up step)."),
    sharded: bool = typer.Option(
        False,
        "--sharded",
        help="Rank groups of DeepSpeed ranks on a 2-node local cluster: "
        "agreement with the un-sharded path, the coordinator's share, a rank lost mid-run.",
    ),
    groups: int = typer.Option(2, min=1, help="--sharded: rank groups (one node each)."),
    ranks: int = typer.Option(2, min=1, help="--sharded: ranks per group."),
) -> None:
    """Weak scaling 1 -> 2 workers and the coordinator's share of a meta-step, coordinator vs all-reduce aggregation;
    with --sharded, the same runtime with DeepSpeed rank groups across nodes."""
    if sharded:
        from metascale.bench.sharded import run as run_sharded

        emit(run_sharded(groups, ranks, steps))
        return
    from metascale.bench.scaling import SIZES, run

    chosen = [s.strip() for s in sizes.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SIZES]
    if unknown or not chosen:
        raise typer.BadParameter(
            f"unknown size(s) {unknown}; expected some of {', '.join(SIZES)}", param_hint="--sizes"
        )
    emit(run(chosen, tasks_per_worker, steps))


@bench_app.command(name="memory")
def memory(
    budget_mib: float = typer.Option(1024.0, min=64, help="Per-process memory budget for the largest ViT (CPU)."),
    coordinator_params: int = typer.Option(
        1_000_000_000,
        min=0,
        help="Model size for the coordinator's memory "
        "(~16 bytes a parameter: needs ~17 GB at the default; 0 skips it).",
    ),
    device: Device = typer.Option(Device.cpu, help="cuda: the largest ViT meta-trainable on this one GPU."),
    mixed_mode_84: bool = typer.Option(
        True,
        "--mixed-mode-84/--no-mixed-mode-84",
        help="Mixed vs reverse mode on 5-way 5-shot 84x84 episodes too (the headline ratios; the longest part).",
    ),
) -> None:
    """ZeRO-3 per-rank memory (2 ranks / 1), the largest ViT meta-trainable under a budget, the coordinator's bytes."""
    if device is Device.cuda:
        from metascale.bench.gpu_memory import run as run_gpu

        _need_cuda()
        emit(run_gpu())
    else:
        from metascale.bench.memory import run

        emit(run(budget_mib, coordinator_params, mixed_mode_84=mixed_mode_84))


@bench_app.command(name="dg")
def dg(
    job: str = typer.Argument(..., help="A domain-generalisation job spec (data.source domains or spurious)."),
    targets: str = typer.Option("", help="Held-out domains, comma-separated (default: the job's data.target)."),
    seeds: str = typer.Option("0,1,2", help="Seeds, comma-separated: each trains every method afresh."),
    methods: str = typer.Option("mldg,erm_pooled", help="Methods, comma-separated: mldg, erm_pooled."),
    overrides: list[str] = typer.Option([], "--set", help="Spec overrides, as for metascale run."),
    out: str = typer.Option("", help="Append each finished run to this file as one JSON line."),
) -> None:
    """MLDG vs pooled ERM: held-out-domain accuracy, mean +- standard error over seeds, and the paired difference."""
    from metascale.bench.dg import METHODS, run
    from metascale.config import load_spec

    spec = load_spec(job, list(overrides))  # a bad job or override fails now, before any training
    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    if not chosen or any(m not in METHODS for m in chosen):
        raise typer.BadParameter(f"{methods!r}: expected some of {', '.join(METHODS)}", param_hint="--methods")
    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise typer.BadParameter(f"{seeds!r}: expected integers, comma-separated", param_hint="--seeds") from None
    target_list = [t.strip() for t in targets.split(",") if t.strip()] or [str(getattr(spec.data, "target", ""))]
    for t in target_list:
        load_spec(job, [*overrides, f"data.target={t}"])  # an unknown domain is refused with the spec's reason
    emit(run(job, target_list, seed_list or [0], chosen, list(overrides), out or None))
