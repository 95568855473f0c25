"""The `metascale` command: run, eval, export, validate, bench, data, and the cluster verbs (submit, status, logs, ...).

Every user-facing error is a MetascaleError: printed as one clear message, exit code 2 for bad input, no stack trace.
Sub-command groups live next to what they drive (`bench/cli.py`, `data/cli.py`, ...) and are attached here.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Optional

import typer

from metascale.errors import MetascaleError

app = typer.Typer(
    name="metascale",
    help="Distributed meta-training: write a job spec, run it locally or on a cluster, watch it in W&B.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _print_version(value: bool) -> None:
    if value:
        from metascale import version

        typer.echo(f"metascale {version()}")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print metascale's version and exit."
    ),
) -> None:
    pass


SpecArg = typer.Argument(..., help="Job spec (YAML).", show_default=False)
SetOpt = typer.Option([], "--set", help="Override a spec field: dotted.key=value (repeatable).")


@app.command()
def validate(spec: Path = SpecArg, set_: list[str] = SetOpt) -> None:
    """Check a job spec and print it with every default filled in."""
    from metascale.config import dump_spec, load_spec

    typer.echo(dump_spec(load_spec(spec, set_)), nl=False)
    typer.echo(f"# {spec}: valid", err=True)


@app.command()
def run(
    spec: Path = SpecArg,
    set_: list[str] = SetOpt,
    resume: bool = typer.Option(False, "--resume", help="Continue from the job's latest good checkpoint."),
    auto_resume: bool = typer.Option(
        False,
        "--auto-resume",
        help="Continue from the latest good checkpoint if the job has one, else start it (cluster jobs, retries).",
    ),
) -> None:
    """Meta-train a job (embedded local Ray by default; cluster.address joins a cluster)."""
    from metascale.config import load_spec

    if resume and auto_resume:
        from metascale.errors import CheckpointError

        raise CheckpointError(
            "pass either --resume (a checkpoint must exist) or --auto-resume (continue if one "
            "exists, else start), not both"
        )
    job = load_spec(spec, set_)  # before importing torch: a bad spec fails fast
    from metascale.train import train

    typer.echo(result_line(train(job, resume="auto" if auto_resume else resume)))


@app.command(name="eval")
def eval_(
    spec: Path = SpecArg,
    set_: list[str] = SetOpt,
    checkpoint: Optional[str] = typer.Option(None, help="Checkpoint to load (default: the job's latest)."),
    episodes: Optional[int] = typer.Option(None, min=1, help="Episodes (default: eval.final_episodes)."),
) -> None:
    """Evaluate meta-parameters on held-out tasks: mean accuracy (or MSE) with a 95% confidence interval."""
    from metascale.config import load_spec
    from metascale.evaluate import evaluate_checkpoint

    typer.echo(result_line(evaluate_checkpoint(load_spec(spec, set_), checkpoint, episodes)))


@app.command()
def export(
    source: str = typer.Argument(
        ...,
        metavar="RUN_OR_CHECKPOINT",
        show_default=False,
        help="A job spec (its latest good checkpoint), a checkpoint directory, or one "
        "checkpoint (a step-NNNNNNNN folder or .ckpt file); local or a URL.",
    ),
    to: str = typer.Option(
        ...,
        "--to",
        help="The file to write (local path or URL): safetensors, or .npz for a distill job's synthetic set.",
    ),
) -> None:
    """Write a checkpoint's model weights as one safetensors file, named as the model's state_dict() keys (a distill
    job: its synthetic images, labels and inner lr as .npz; a darts job: also the derived architecture as JSON)."""
    from metascale.export import export_model

    typer.echo(result_line(export_model(source, to)))


def result_line(result: dict) -> str:
    """The last line of `run` and `eval`: strict JSON, which has no NaN or infinity, so a non-finite number (the
    loss of a diverged run) is written as null rather than as a bare NaN (JSON.parse, Go's encoding/json refuse it)."""
    return json.dumps(_finite(result), allow_nan=False)


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _attach_groups() -> None:
    from metascale.bench.cli import bench_app
    from metascale.data.cli import data_app

    app.add_typer(bench_app, name="bench")
    app.add_typer(data_app, name="data")

    from metascale.submit.commands import register as register_cluster_verbs

    register_cluster_verbs(app)  # submit, status, logs, cancel, list at top level

    from metascale.plot import register as register_plot

    register_plot(app)


_attach_groups()


def main() -> None:
    try:
        app()
    except MetascaleError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
