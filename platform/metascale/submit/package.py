"""What travels with a job: the validated, fully resolved spec and a fixed argument vector that runs it.

The spec is loaded and validated here (overrides applied) before anything is sent; the cluster receives the resolved
YAML, so it runs exactly what was checked. The entrypoint never contains user input: it is
`metascale run <file> --auto-resume` with a file name chosen by metascale, joined with shlex.join, so no job name,
path or value can reach a shell. `--auto-resume`: a job the cluster retries (RayJob backoffLimit) continues from its
newest checkpoint, and a first attempt starts fresh. The one
field that names a command is a `pipe:` data URL (data/urls.py: run without a shell, but a command of the spec's
choosing on every worker), so a spec holding one is refused unless the caller opts in (`submit --allow-pipe`).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

import yaml

from metascale.config import JobSpec, ShardsData, dump_spec, load_spec, parse_spec
from metascale.errors import OptInError
from metascale.submit.targets import new_job_id

SPEC_FILE = "metascale-job.yaml"
# Container env of the pods a RayJob brings up: glibc allocator settings (freed memory faulted back in
# slowly and stalled meta-steps: one took 85 s instead of ~3 on a 2-core VM). Not sent as a Ray runtime_env: the driver's own ray.init sets its workers' env,
# and Ray refuses a job whose runtime_env sets the same variables.
JOB_ENV = {
    "MALLOC_MMAP_THRESHOLD_": "33554432",
    "MALLOC_TRIM_THRESHOLD_": "68719476736",
    "MALLOC_TOP_PAD_": "268435456",
    "PYTHONUNBUFFERED": "1",
}


@dataclass(frozen=True)
class PreparedJob:
    job_id: str
    spec: JobSpec
    spec_yaml: str

    def entrypoint(self, spec_path: str = SPEC_FILE) -> str:
        return shlex.join(["metascale", "run", spec_path, "--auto-resume"])


def prepare(spec_path: str | Path, overrides: list[str] = (), allow_pipe: bool = False) -> PreparedJob:
    """Validates the spec and makes it cluster-ready: 'local' Ray becomes 'auto' (join the cluster it runs on)."""
    spec = load_spec(spec_path, list(overrides))
    if isinstance(spec.data, ShardsData) and spec.data.url.startswith("pipe:") and not allow_pipe:
        raise OptInError(
            f"{spec_path}: data.url is a pipe: command, which every worker of the cluster would run; "
            f"pass --allow-pipe to submit it anyway"
        )
    if spec.cluster.address == "local":
        spec = spec.model_copy(update={"cluster": spec.cluster.model_copy(update={"address": "auto"})})
    text = dump_spec(spec)
    parse_spec(yaml.safe_load(text), f"{spec_path} (resolved)")  # what we send must load back
    return PreparedJob(job_id=new_job_id(spec.name), spec=spec, spec_yaml=text)
