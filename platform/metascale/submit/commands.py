"""The cluster verbs: `metascale submit | status | logs | cancel | list`.

A job ID remembers its cluster (see state.py), so after `submit --to URL` the other verbs need only the ID;
`--to` overrides that, and `list` defaults to the last cluster used.
"""

from __future__ import annotations

import json
import re
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
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def submit(
    spec: Path = typer.Argument(..., help="Job spec (YAML).", show_default=False),
    to: str = typer.Option(..., "--to", help="http(s)://HOST:8265 (Ray) or k8s://[CONTEXT/]NAMESPACE (KubeRay)."),
    set_: list[str] = typer.Option([], "--set", help="Override a spec field: dotted.key=value (repeatable)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate everything (server-side on k8s), create nothing."),
    image: Optional[str] = typer.Option(None, help="k8s: the container image (same as --set kubernetes.image=...)."),
    wandb_secret: Optional[str] = typer.Option(
        None, help="k8s: Secret holding the W&B key under `api-key` (same as --set kubernetes.wandb_secret=...)."
    ),
    queue: Optional[str] = typer.Option(None, help="k8s: a Kueue LocalQueue; the RayJob waits there until admitted."),
    cluster: Optional[str] = typer.Option(
        None, help="k8s: run on this existing RayCluster (e.g. the Helm chart's) instead of a new one."
    ),
    allow_pipe: bool = typer.Option(
        False, "--allow-pipe", help="Send a spec whose data.url is a pipe: command (it runs on the cluster)."
    ),
    allow_ephemeral: bool = typer.Option(
        False,
        "--allow-ephemeral",
        help="k8s: submit although checkpoints or offline W&B files would live only inside the job's pods.",
    ),
) -> None:
    """Validate a job spec, then send it to a Ray cluster or a KubeRay namespace; prints the job ID."""
    from metascale.submit.package import prepare

    target = parse_target(to)
    overrides = list(set_)
    for key, value in (("image", image), ("wandb_secret", wandb_secret)):
        if value is not None:
            overrides.append(f"kubernetes.{key}={json.dumps(value)}")  # a YAML string, whatever it holds
    if not isinstance(target, K8sTarget) and (queue or cluster or image or wandb_secret):
        raise TargetError("--queue, --cluster, --image and --wandb-secret apply to k8s:// targets only")
    for flag, value in (("--queue", queue), ("--cluster", cluster)):
        if value is not None and not _DNS_LABEL.match(value):
            raise TargetError(f"{flag} {value!r}: expected a Kubernetes name (lowercase letters, digits and '-')")
    if queue and cluster:
        raise TargetError(
            "--queue and --cluster exclude each other: Kueue admits RayJobs that bring up their own "
            "RayCluster (KubeRay cannot suspend a job on an existing one)"
        )
    job = prepare(spec, overrides, allow_pipe=allow_pipe)  # validated before anything is sent
    if isinstance(target, K8sTarget):
        from metascale.submit.ephemeral import check_persistent
        from metascale.submit.kuberay import KubeRayJobs

        if not allow_ephemeral:
            check_persistent(job.spec, existing_cluster=cluster is not None, source=str(spec))
        backend: Backend = KubeRayJobs(target, queue=queue, cluster=cluster)
    else:
        backend = backend_for(target)
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
    backend = backend_for(_target_of(job_id, to))
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

    backend_for(_target_of(job_id, to)).logs(job_id, follow, emit)


def cancel(job_id: str = IdArg, to: Optional[str] = ToOpt) -> None:
    """Stop a job, keeping its record: status and logs still answer (Ray: stop_job; k8s: suspend the RayJob)."""
    target = _target_of(job_id, to)
    done = backend_for(target).cancel(job_id)
    typer.echo(done or f"cancelled {job_id} on {target.url}", err=True)


def list_(to: Optional[str] = ToOpt) -> None:
    """List metascale jobs on a cluster (default: the last one used)."""
    url = to or state.last_target()
    if not url:
        raise TargetError("no cluster to list: pass --to URL (no job was submitted from this machine yet)")
    for info in backend_for(parse_target(url)).list():
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


def _row(info: JobInfo) -> str:
    return "\t".join(x for x in (info.job_id, info.status, info.name, info.message) if x)
