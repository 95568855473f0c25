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
