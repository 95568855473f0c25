"""Shared test set-up: one torch thread (2-core machines shared with other processes), small deterministic helpers."""

from __future__ import annotations

import os
import sys

# Before anything imports ray (it reads this at import): keep every Ray component on 127.0.0.1 (without it, Ray
# rewrote 127.0.0.1 to the machine's interface address, and ray.cluster_utils.Cluster hung).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
# Tests never go online: `logging.wandb.mode: auto` (the default) resolves to offline without a key, and WANDB_MODE
# decides it before the key does; an explicit mode in a spec still wins (the tests use offline or disabled).
os.environ.pop("WANDB_API_KEY", None)
os.environ["WANDB_MODE"] = "offline"
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _own_wandb_service():
    """A W&B run in the test process starts a wandb-core service and records its address in WANDB_SERVICE, which
    every later subprocess inherits and joins: a job SIGKILLed in one (test_resume) left its run registered in that
    shared service, and the resumed job was refused ('run ID ... is in use'). The service ends with the test that
    started it (teardown also clears WANDB_SERVICE), so each `metascale` subprocess starts its own."""
    yield
    wandb = sys.modules.get("wandb")
    if getattr(wandb, "teardown", None):
        wandb.teardown()


@pytest.fixture
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture(params=[0o022, 0o077], ids=lambda m: f"umask{m:03o}")
def umask(request) -> int:
    """The process umask set to each common value for the test, restored after it."""
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


@pytest.fixture
def http_server():
    """Serves a directory over real HTTP on 127.0.0.1 (object stores' https:// endpoints read the same way through
    fsspec); returns a function dir -> base URL. Every server it starts is shut down after the test."""
    import functools
    import io
    import re
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        """Also answers `Range: bytes=A-B` with 206 and those bytes, as object stores do."""

        def log_message(self, *args):
            pass

        def send_head(self):
            m = re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers.get("Range", ""))
            path = self.translate_path(self.path)
            if not m or not os.path.isfile(path):
                return super().send_head()
            with open(path, "rb") as f:
                f.seek(int(m.group(1)))
                data = f.read(int(m.group(2)) - int(m.group(1)) + 1)
            self.send_response(206)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            return io.BytesIO(data)

    servers = []

    def serve(directory) -> str:
        server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(directory)))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


def _job(root, **overrides):
    """A small, fast classification job (float64, 2 workers) with checkpoints under `root`; `a__b=v` overrides
    field a.b."""
    from metascale.config import parse_spec

    raw = {
        "name": "t",
        "model": {"name": "conv4", "hidden": 8},
        "data": {"source": "synthetic", "ways": 3, "shots": 1, "queries": 2, "classes": 20},
        "algorithm": {"name": "maml", "inner": {"steps": 2, "lr": 0.3}},
        "outer": {"meta_batch": 6, "steps": 6},
        "eval": {"every": 3, "episodes": 6, "final_episodes": 12},
        "checkpoint": {"dir": str(root / "ckpt"), "every": 2},
        "logging": {"wandb": {"mode": "disabled"}, "progress": False},
        "executor": {"dtype": "float64"},
        "cluster": {"workers": 2},
    }
    for dotted, value in overrides.items():
        node = raw
        *parents, last = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return parse_spec(raw)


@pytest.fixture
def make_job():
    return _job


def _final_params(spec):
    from metascale.cluster import checkpoint

    step, state = checkpoint.load_latest(spec.path(spec.checkpoint.dir))
    assert step == spec.outer.steps
    return state["params"]


@pytest.fixture
def final_params():
    """The meta-parameters of a finished run's last checkpoint."""
    return _final_params


def _same_final_params(reference_spec, spec) -> None:
    reference, got = _final_params(reference_spec), _final_params(spec)
    assert reference.keys() == got.keys()
    for k in reference:
        assert torch.equal(reference[k], got[k]), k


@pytest.fixture
def same_final_params():
    """Asserts that two finished runs' last checkpoints hold the same meta-parameters, bit for bit:
    same_final_params(reference_spec, spec)."""
    return _same_final_params


@pytest.fixture
def ends_fault_free():
    """The fault drills' verdict on a run that lost a worker: ends_fault_free(out, faulty_spec, clean_spec,
    fired=None) asserts that the fault fired (`fired`: the drill's marker file), that the run finished and counted
    the loss, and that it ended with the fault-free run's meta-parameters, bit for bit."""

    def check(out, faulty, clean, fired=None) -> None:
        assert fired is None or fired.exists(), "the fault never fired"
        assert out["status"] == "finished" and out["worker_failures"] >= 1, out
        _same_final_params(clean, faulty)

    return check


class LinearPolicy:
    """MAML-RL with a linear Gaussian policy a = W s + b + exp(log_std) eps on 2-D navigation, float64, at fixed
    meta-parameters `theta`: small enough for a test to write its log-probs and rollouts out by hand."""

    def __init__(self):
        from metascale.algorithms.maml_rl import LOG_STD

        self.theta = {
            "head.weight": torch.tensor([[-0.5, 0.3], [0.2, -0.4]], dtype=torch.float64),
            "head.bias": torch.tensor([0.1, -0.05], dtype=torch.float64),
            LOG_STD: torch.tensor([-0.7, -0.7], dtype=torch.float64),
        }

    def algorithm(self, data, lr: float, **maml_rl):
        """The maml_rl algorithm over this policy: one inner step of `lr`, `maml_rl` its MAMLRLSpec fields."""
        from metascale.algorithms import build_algorithm
        from metascale.config import AlgorithmSpec, InnerLoopSpec, MAMLRLSpec, MLPSpec
        from metascale.models import build_model

        model = build_model(MLPSpec(in_features=2, hidden=[]), 2).double()
        spec = AlgorithmSpec(name="maml_rl", inner=InnerLoopSpec(lr=lr, steps=1), maml_rl=MAMLRLSpec(**maml_rl))
        alg = build_algorithm(spec, model, data)
        assert set(alg.init(dict(model.named_parameters()))) == set(self.theta)
        return alg

    def flat(self, grads: dict) -> torch.Tensor:
        """A gradient over `theta`'s names as one vector, in `theta`'s order."""
        return torch.cat([grads[k].reshape(-1) for k in self.theta])


@pytest.fixture
def linear_policy() -> LinearPolicy:
    return LinearPolicy()


RAY_HEAD_PORTS = (
    "port",
    "dashboard-port",
    "ray-client-server-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "metrics-export-port",
    "node-manager-port",
    "object-manager-port",
    "runtime-env-agent-port",
)


@pytest.fixture(scope="module")
def ray_head_ports() -> dict[str, int]:
    """`ray start --head` flag -> a free loopback port, for every port a head opens: a test's head never meets
    another Ray (a parallel test run, a user's) on Ray's fixed default ports."""
    import socket

    socks = [socket.socket() for _ in RAY_HEAD_PORTS]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = {flag: s.getsockname()[1] for flag, s in zip(RAY_HEAD_PORTS, socks)}
    for s in socks:
        s.close()
    return ports


@pytest.fixture
def kill_tree():
    """SIGKILL a `metascale run` subprocess, then the Ray processes it started (ours, by pid), so nothing outlives
    the test."""
    import signal

    import psutil

    def kill(proc) -> None:
        children = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        for child in children:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(children, timeout=30)

    return kill


@pytest.fixture(scope="module")
def local_ray():
    """An embedded Ray for one test module (4 logical CPUs on a 2-core machine: the workers mostly wait on each
    other), shut down after it."""
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture
def drill(monkeypatch, tmp_path):
    """Arms a fault drill (cluster/faults.py) for the pools a test creates: drill("exit:3:1") and so on; returns
    the marker file that exists once an exit or hang has fired."""
    from metascale.cluster import faults

    marker = tmp_path / "fault-fired"

    def arm(what: str):
        monkeypatch.setenv(faults.FAULT, what)
        monkeypatch.setenv(faults.ONCE, str(marker))
        return marker

    return arm


@pytest.fixture(scope="session")
def kuberay_crds():
    """The folder of KubeRay's CRD files (tests/k8s_emulator.py: crd_dir), for tests that validate ray.io objects
    against their schema; skips the test where no copy is found (a fresh clone without network)."""
    from k8s_emulator import CRD_ENV, crd_dir

    found = crd_dir()
    if found is None:
        pytest.skip(
            f"KubeRay's CRD schemas not found: set ${CRD_ENV}, or run scripts/fetch-kuberay-crds.sh with network access"
        )
    return found


@pytest.fixture
def cli(capsys):
    """Runs `metascale ARGS` in-process through main(), as the console script does: cli(*args) -> (exit code,
    stdout, stderr)."""
    from metascale.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        argv = sys.argv
        sys.argv = ["metascale", *args]
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        finally:
            sys.argv = argv
        out, err = capsys.readouterr()
        return code, out, err

    return run
