"""The cluster verbs: `metascale submit | status | logs | cancel | list`.

A job ID remembers its cluster (see state.py), so after `submit --to URL` the other verbs need only the ID;
`--to` overrides that, and `list` defaults to the last cluster used.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

import typer

from metascale.submit import state
from metascale.submit.backend import TERMINAL, Backend, JobInfo, backend_for
from metascale.submit.targets import K8sTarget, TargetError, check_job_id, parse_target

ToOpt = typer.Option(None, "--to", help="http(s)://HOST:8265 (Ray) or k8s://[CONTEXT/]NAMESPACE (KubeRay).")
IdArg = typer.Argument(..., help="Job ID printed by `metascale submit`.", show_default=False)


def submit(
    spec: Path = typer.Argument(..., help="Job spec (YAML).", show_default=False),
    to: str = typer.Option(..., "--to", help="http(s)://HOST:8265 (Ray) or k8s://[CONTEXT/]NAMESPACE (KubeRay)."),
    set_: list[str] = typer.Option([], "--set", help="Override a spec field: dotted.key=value (repeatable)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate everything (server-side on k8s), create nothing."),
    image: Optional[str] = typer.Option(None, help="k8s: the container image (default metascale:0.1.0)."),
    wandb_secret: Optional[str] = typer.Option(None, help="k8s: Secret holding the W&B key under `api-key`."),
    allow_pipe: bool = typer.Option(False, "--allow-pipe",
                                    help="Send a spec whose data.url is a pipe: command (it runs on the cluster)."),
) -> None:
    """Validate a job spec, then send it to a Ray cluster or a KubeRay namespace; prints the job ID."""
    from metascale.submit.package import prepare

    target = parse_target(to)
    job = prepare(spec, set_, allow_pipe=allow_pipe)  # validated before anything is sent
    backend = _backend(target, image=image, wandb_secret=wandb_secret)
    job_id = backend.submit(job, dry_run=dry_run)
    if dry_run:
        typer.echo(f"dry run: {job.spec.name} is valid and {target.url} accepted it; nothing was created", err=True)
        return
    state.remember(job_id, target.url, job.spec.name)
    typer.echo(job_id)
    typer.echo(f"submitted {job.spec.name} to {target.url}; follow it with: metascale logs {job_id} --follow", err=True)


def status(
    job_id: str = IdArg,
    to: Optional[str] = ToOpt,
    wait: bool = typer.Option(False, "--wait", help="Block until the job ends; exit 1 unless it SUCCEEDED."),
    poll: float = typer.Option(2.0, min=0.1, help="Seconds between polls with --wait."),
) -> None:
    """Print a job's state: PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED, and the cluster's message."""
    backend = _backend(_target_of(job_id, to))
    info = backend.status(job_id)
    while wait and info.status not in TERMINAL:
        time.sleep(poll)
        info = backend.status(job_id)
    typer.echo(_row(info))
    if wait and info.status != "SUCCEEDED":
        raise typer.Exit(1)


def logs(
    job_id: str = IdArg,
    to: Optional[str] = ToOpt,
    follow: bool = typer.Option(False, "--follow", "-f", help="Stream until the job ends."),
) -> None:
    """Print a job's driver log (its progress lines); --follow streams it."""

    def emit(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    _backend(_target_of(job_id, to)).logs(job_id, follow, emit)


def cancel(job_id: str = IdArg, to: Optional[str] = ToOpt) -> None:
    """Stop a job (Ray: stop_job; k8s: delete the RayJob, which removes its cluster)."""
    target = _target_of(job_id, to)
    _backend(target).cancel(job_id)
    typer.echo(f"cancelled {job_id} on {target.url}", err=True)


def list_(to: Optional[str] = ToOpt) -> None:
    """List metascale jobs on a cluster (default: the last one used)."""
    url = to or state.last_target()
    if not url:
        raise TargetError("no cluster to list: pass --to URL (no job was submitted from this machine yet)")
    for info in _backend(parse_target(url)).list():
        typer.echo(_row(info))


def register(app: typer.Typer) -> None:
    app.command()(submit)
    app.command()(status)
    app.command()(logs)
    app.command()(cancel)
    app.command(name="list")(list_)


def _target_of(job_id: str, to: str | None):
    check_job_id(job_id)
    url = to or state.target_of(job_id)
    if not url:
        raise TargetError(f"job {job_id} was not submitted from this machine: pass --to URL to say where it runs")
    return parse_target(url)


def _backend(target, image: str | None = None, wandb_secret: str | None = None) -> Backend:
    if isinstance(target, K8sTarget) and (image or wandb_secret):
        from metascale.submit.kuberay import KubeRayJobs
        from metascale.submit.rayjob import ClusterShape

        defaults = ClusterShape()
        shape = ClusterShape(image=image or defaults.image, wandb_secret=wandb_secret or defaults.wandb_secret)
        return KubeRayJobs(target, shape)
    return backend_for(target)


def _row(info: JobInfo) -> str:
    return "\t".join(x for x in (info.job_id, info.status, info.name, info.message) if x)
