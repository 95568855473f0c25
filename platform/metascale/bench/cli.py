"""`metascale bench ...`: each benchmark measures metascale against a baseline in the same run."""

from __future__ import annotations

import json

import typer

bench_app = typer.Typer(help="Benchmarks: each prints one JSON object as its last line.", no_args_is_help=True)


def emit(result: dict) -> None:
    """The contract of every benchmark: the last line of stdout is one JSON object."""
    typer.echo(json.dumps(result, sort_keys=True))


from metascale.bench.data import data as _data  # noqa: E402 (after emit, which it imports)

bench_app.command(name="data")(_data)


@bench_app.command(name="es")
def es(pairs_per_worker: int = typer.Option(4, min=1, help="Antithetic pairs one ES worker scores per step.")) -> None:
    """Bytes an ES worker sends per step (10M-parameter model) vs backprop; iMAML peak memory at 20 vs 5 steps."""
    from metascale.bench.es import run

    emit(run(pairs_per_worker))


@bench_app.command(name="scaling")
def scaling(
    sizes: str = typer.Option("0.1M,10M,100M", help="Model sizes to measure (comma-separated: 0.1M, 10M, 100M)."),
    tasks_per_worker: int = typer.Option(8, min=1, help="Tasks each worker runs per meta-step (weak scaling)."),
    steps: int = typer.Option(2, min=1, help="Measured steps per configuration (best of; after one warm-up step)."),
) -> None:
    """Weak scaling 1 -> 2 workers and the coordinator's share of a meta-step, coordinator vs all-reduce aggregation."""
    from metascale.bench.scaling import SIZES, run

    chosen = [s.strip() for s in sizes.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SIZES]
    if unknown or not chosen:
        raise typer.BadParameter(f"unknown size(s) {unknown}; expected some of {', '.join(SIZES)}", param_hint="--sizes")
    emit(run(chosen, tasks_per_worker, steps))
