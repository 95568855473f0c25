"""Checks on the built image (deploy/Dockerfile, scripts/build-image.sh), run with a container engine: its CLI entry
points, `metascale validate` of every job in jobs/, a non-root user, KubeRay's command form and probes, a short
sinusoid job with no network, and a Ray head from the image that accepts `metascale submit` from this machine.

The image is $METASCALE_IMAGE (default metascale:0.1.0-cpu), the engine the one $DOCKER (default `docker`) talks to
($DOCKER_HOST). .ci/run starts an engine and builds the image first. Where no engine answers or the image is not
built, these tests skip with one line, except under CI=true, where they fail: CI must check the image.
Containers run with --network none or --network host only; each is named, and removed by name when a test ends.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
JOBS = REPO / "jobs"
DOCKER = os.environ.get("DOCKER") or "docker"
IMAGE = os.environ.get("METASCALE_IMAGE") or "metascale:0.1.0-cpu"
IN_CI = os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}
VENV_BIN = Path(sys.executable).parent
SIZE_LIMIT = (
    3_000_000_000  # bytes; the CPU image is ~1.9 GB (torch ~750 MB, Ray ~240 MB): a wheelhouse left in would cross it
)
# a short sinusoid run: 20 meta-steps, one worker, a 20-episode final evaluation
SHORT = [
    "--set",
    "outer.steps=20",
    "--set",
    "cluster.workers=1",
    "--set",
    "eval.every=0",
    "--set",
    "eval.final_episodes=20",
    "--set",
    "checkpoint.every=10",
]


def _docker(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert out.returncode == 0, (
            f"docker {' '.join(args[:3])} ...: exit {out.returncode}: {out.stderr.strip()[-2000:]}"
        )
    return out


def _remove(name: str) -> None:
    subprocess.run([DOCKER, "rm", "-f", name], capture_output=True, timeout=60)


def _unavailable() -> str | None:
    """Why the image cannot be checked here, or None: the engine answers and holds the image."""
    try:
        version = subprocess.run(
            [DOCKER, "version", "--format", "{{.Server.Version}}"], capture_output=True, text=True, timeout=20
        )
    except FileNotFoundError:
        return f"no container engine: `{DOCKER}` is not installed (the image checks need one; .ci/run starts one)"
    except subprocess.TimeoutExpired:
        return f"no container engine: `{DOCKER} version` did not answer within 20 s"
    if version.returncode != 0:
        first = (version.stderr.strip().splitlines() or ["no answer"])[0]
        return f"no container engine answers ({first}); scripts/engine.sh start starts one"
    if _docker("image", "inspect", IMAGE, check=False).returncode != 0:
        return f"the image {IMAGE} is not built (scripts/build-image.sh builds it)"
    return None


UNAVAILABLE = _unavailable()
if UNAVAILABLE and not IN_CI:  # one line for the whole module (a laptop without Docker)
    pytest.skip(UNAVAILABLE, allow_module_level=True)


@pytest.fixture(scope="module")
def image() -> str:
    """The image's name; under CI=true a missing engine or image fails every test here (never a skip)."""
    if UNAVAILABLE:
        pytest.fail(f"CI=true but {UNAVAILABLE}", pytrace=False)
    return IMAGE


def run_in(
    image: str, *cmd: str, timeout: float = 120, network: str = "none", options: tuple = ()
) -> subprocess.CompletedProcess:
    """`docker run --rm` of cmd in the image, named so that a run past its timeout is removed, not left behind."""
    assert network in {"none", "host"}
    name = f"metascale-test-{uuid.uuid4().hex[:10]}"
    try:
        return subprocess.run(
            [DOCKER, "run", "--rm", "--name", name, "--network", network, *options, image, *cmd],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{' '.join(cmd)} in {image} did not finish within {timeout} s") from None
    finally:
        _remove(name)


def test_cli_entry_point_and_versions(image):
    out = run_in(image, "metascale", "--version", timeout=60)
    assert out.returncode == 0 and "0.1.0" in out.stdout, out.stdout + out.stderr
    # the extras a cluster job needs are in the image: sharded workers import DeepSpeed, `submit --to k8s://` kubernetes,
    # the HalfCheetah tasks mujoco
    out = run_in(image, "python", "-c", "import deepspeed, kubernetes, mujoco", timeout=120)
    assert out.returncode == 0, out.stderr.strip().splitlines()[-1:]
    # every distribution the image holds is at the version deploy/constraints.txt pins; Ray and torch match this
    # venv's, which submits to the image's Ray
    script = "import importlib.metadata as m, json; print(json.dumps({d.metadata['Name'].lower().replace('_', '-'): d.version for d in m.distributions()}))"
    out = run_in(image, "python", "-c", script, timeout=60)
    assert out.returncode == 0, out.stderr
    installed = json.loads(out.stdout)
    pins = dict(
        ln.split("==")
        for ln in (REPO / "deploy" / "constraints.txt").read_text().splitlines()
        if ln and not ln.startswith("#")
    )
    pins = {k.lower().replace("_", "-"): v for k, v in pins.items()}
    wrong = {k: (installed[k], v) for k, v in pins.items() if k in installed and installed[k] != v}
    assert not wrong, f"installed != pinned: {wrong}"
    from importlib.metadata import version

    for dist in ("ray", "torch", "metascale"):  # torch without its local label (+cpu, +cu128)
        assert installed[dist].split("+")[0] == version(dist).split("+")[0], (
            f"{dist}: image {installed[dist]}, this venv {version(dist)}"
        )
    variant = _docker(
        "image", "inspect", "-f", '{{index .Config.Labels "org.metascale.variant"}}', image
    ).stdout.strip()
    assert installed["torch"].endswith({"cpu": "+cpu", "cuda": "+cu128"}[variant]), (variant, installed["torch"])


def test_validate_every_job(image):
    jobs = sorted(p.name for p in JOBS.glob("*.yaml"))
    assert jobs
    loop = 'for f in /jobs/*.yaml; do if metascale validate "$f" >/dev/null 2>/tmp/err; then echo "ok $f"; else echo "FAILED $f: $(tail -1 /tmp/err)"; fi; done'
    out = run_in(image, "bash", "-c", loop, options=("-v", f"{JOBS}:/jobs:ro"), timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [f"ok /jobs/{j}" for j in jobs], out.stdout


def test_runs_as_non_root_with_the_entry_point_kuberay_uses(image):
    config = json.loads(_docker("image", "inspect", "-f", "{{json .Config}}", image).stdout)
    assert config["User"] == "1000:1000", f"the image's USER is {config['User']!r}, not 1000:1000"
    assert config["Entrypoint"] == ["/usr/bin/tini", "--"], f"ENTRYPOINT is {config['Entrypoint']}"
    assert (config.get("Healthcheck") or {}).get("Test") == ["CMD", "/usr/local/bin/metascale-healthcheck"], (
        f"HEALTHCHECK is {config.get('Healthcheck')}"
    )
    # KubeRay replaces the entry point with a login shell: `/bin/bash -lc -- "ulimit -n 65536; ray start ..."`
    # (Debian's /etc/profile resets PATH there); its probes run `bash -c "wget ... | grep success"`.
    check = (
        "id -u; id -g; echo $HOME; command -v ray metascale wget python; "
        "test -w $HOME/work && echo home-writable; test -w /opt/venv/lib || echo venv-read-only; "
        "test -e /wheels || echo no-wheelhouse"
    )
    out = run_in(image, "-lc", "--", check, options=("--entrypoint", "/bin/bash"), timeout=60)
    assert out.returncode == 0, out.stderr
    want = [
        "1000",
        "1000",
        "/home/ray",
        "/opt/venv/bin/ray",
        "/opt/venv/bin/metascale",
        "/usr/bin/wget",
        "/opt/venv/bin/python",
        "home-writable",
        "venv-read-only",
        "no-wheelhouse",
    ]
    assert out.stdout.splitlines() == want, f"in KubeRay's login shell: {out.stdout.split()} != {want}"


def test_image_size(image):
    size = int(_docker("image", "inspect", "-f", "{{.Size}}", image).stdout)
    assert 0 < size < SIZE_LIMIT, f"{image} is {size / 1e9:.2f} GB (limit {SIZE_LIMIT / 1e9:.1f} GB)"


@pytest.mark.slow
def test_sinusoid_job_runs_with_no_network(image):
    out = run_in(
        image,
        "metascale",
        "run",
        "/jobs/sinusoid-maml.yaml",
        *SHORT,
        options=("-v", f"{JOBS}:/jobs:ro", "--shm-size", "512m"),
        timeout=300,
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    steps = [ln for ln in out.stdout.splitlines() if ln.startswith("step ")]
    assert steps and steps[-1].startswith("step 20/20 "), out.stdout[-2000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["status"] == "finished" and summary["step"] == 20, summary


def _metascale(*args: str, env: dict, timeout: float) -> subprocess.CompletedProcess:
    """This venv's `metascale` console script (what a user runs), under a bound wait."""
    try:
        return subprocess.run(
            [str(VENV_BIN / "metascale"), *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO
        )
    except subprocess.TimeoutExpired:
        raise AssertionError(f"metascale {' '.join(args[:2])} did not finish within {timeout} s") from None


@pytest.mark.slow
def test_ray_head_from_the_image_runs_a_submitted_job(image, tmp_path, ray_head_ports):
    dash, agent = ray_head_ports["dashboard-port"], ray_head_ports["dashboard-agent-listen-port"]
    # KubeRay's command form, on the host network, every Ray component bound to 127.0.0.1
    ports = " ".join(f"--{flag}={port}" for flag, port in ray_head_ports.items())
    start = (
        f"ulimit -n 65536; ray start --head --block --node-ip-address=127.0.0.1 --dashboard-host=127.0.0.1 "
        f"{ports} --num-cpus=2 --disable-usage-stats"
    )
    env = [
        "RAY_AUTH_MODE=disabled",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0",
        "RAY_USAGE_STATS_ENABLED=0",
        f"METASCALE_AGENT_PORT={agent}",
        f"METASCALE_DASHBOARD_PORT={dash}",
    ]
    name = f"metascale-test-head-{uuid.uuid4().hex[:10]}"
    cid = _docker(
        "run",
        "-d",
        "--name",
        name,
        "--network",
        "host",
        "--shm-size",
        "512m",
        *[a for e in env for a in ("-e", e)],
        "--health-interval",
        "2s",
        "--health-start-period",
        "0s",
        "--entrypoint",
        "/bin/bash",
        image,
        "-lc",
        "--",
        start,
    ).stdout.strip()
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/version", timeout=2)
                break
            except OSError:
                running = _docker("inspect", "-f", "{{.State.Running}}", cid).stdout.strip()
                if running != "true" or time.time() > deadline:
                    logs = _docker("logs", cid, check=False)
                    lines = [ln for ln in (logs.stdout + logs.stderr).splitlines() if ln.strip()] or ["(no output)"]
                    what = "exited" if running != "true" else "ran 120 s"
                    raise AssertionError(
                        f"the Ray head in {image} {what} without serving {url}; its last line: "
                        f"{lines[-1]}\n" + "\n".join(lines[-30:])
                    )
                time.sleep(1)
        # KubeRay's default probes, as its operator writes them (they retry: the agent answers a few seconds after
        # the dashboard), and the image's own HEALTHCHECK
        deadline = time.time() + 60
        for path, port in (("api/local_raylet_healthz", agent), ("api/gcs_healthz", dash)):
            probe = f"wget --tries 1 -T 2 -q -O- http://localhost:{port}/{path} | grep success"
            while _docker("exec", cid, "bash", "-c", probe, check=False).returncode != 0:
                assert time.time() < deadline, f"KubeRay's probe failed for 60 s: {probe}"
                time.sleep(1)
        while (health := _docker("inspect", "-f", "{{.State.Health.Status}}", cid).stdout.strip()) != "healthy":
            assert health == "starting" and time.time() < deadline, f"HEALTHCHECK: {health}"
            time.sleep(1)

        host = {**os.environ, "RAY_AUTH_MODE": "disabled", "METASCALE_STATE_DIR": str(tmp_path / "state")}
        out = _metascale("submit", "jobs/sinusoid-maml.yaml", "--to", url, *SHORT, env=host, timeout=120)
        assert out.returncode == 0, out.stderr
        job_id = out.stdout.strip()
        assert re.fullmatch(r"sinusoid-maml-[a-z0-9]{6}", job_id), out.stdout
        out = _metascale("status", job_id, "--wait", "--poll", "1", env=host, timeout=300)
        assert out.returncode == 0 and out.stdout.split("\t")[1] == "SUCCEEDED", out.stdout + out.stderr
        logs = _metascale("logs", job_id, env=host, timeout=120).stdout
        assert [ln for ln in logs.splitlines() if ln.startswith("step ")][-1].startswith("step 20/20 "), logs[-2000:]
        assert '"status": "finished"' in logs
    finally:
        _remove(cid)
