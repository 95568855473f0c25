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
