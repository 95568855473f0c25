"""Packaging: `metascale --version`; the optional parts (DeepSpeed, the Kubernetes client, matplotlib) come with extras,
every module imports without them, and a missing one is one line naming the extra."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from metascale.extras import EXTRAS, MissingExtraError, check, require

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_version_prints_the_package_version(cli):
    code, out, err = cli("--version")
    assert (code, out, err) == (0, f"metascale {PYPROJECT['project']['version']}\n", "")


def test_dependencies_are_ranges_and_the_extras_hold_the_optional_parts():
    deps = PYPROJECT["project"]["dependencies"]
    pinned = [d for d in deps if "==" in d]
    assert pinned == ["torch==2.13.0"], pinned  # torch stays pinned: nothing may pull a CUDA build
    extras = PYPROJECT["project"]["optional-dependencies"]
    for module, (extra, _) in EXTRAS.items():
        assert any(d.lower().startswith(module) for d in extras[extra]), (module, extra)
        assert not any(d.lower().startswith(module) for d in deps), module
    constraints = (ROOT / "deploy" / "constraints.txt").read_text().lower()
    for name in ("deepspeed==", "kubernetes==", "matplotlib==", "mujoco==", "ray==", "wandb=="):
        assert f"\n{name}" in constraints, name  # the exact versions the tests ran with


def test_every_module_imports_without_the_optional_dependencies():
    """A plain `pip install metascale`: deepspeed, kubernetes and matplotlib absent (None in sys.modules makes any
    import of them fail), every module of the package still imports and the CLI still starts."""
    code = (
        "import sys, pkgutil, importlib\n"
        f"for m in {sorted(EXTRAS)!r}: sys.modules[m] = None\n"
        "import metascale\n"
        "names = [m.name for m in pkgutil.walk_packages(metascale.__path__, 'metascale.')\n"
        "         if not m.name.endswith('__main__')]  # __main__ runs the CLI\n"
        "for n in names: importlib.import_module(n)\n"
        "from metascale.cli import app\n"
        "print(len(names))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert int(out.stdout.strip()) > 50


@pytest.mark.parametrize("module, extra", [(m, e) for m, (e, _) in EXTRAS.items()])
def test_a_missing_extra_is_one_line_naming_it(monkeypatch, module, extra):
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(MissingExtraError) as e:
        require(module)
    assert str(e.value).endswith(f"is not installed: pip install 'metascale[{extra}]'") and "\n" not in str(e.value)


def test_the_drivers_check_is_the_same_line_and_imports_nothing(monkeypatch):
    """The coordinator checks for DeepSpeed (build_pool) without loading it: only the ranks import it."""
    code = "import sys; from metascale.extras import check; check('deepspeed'); print('deepspeed' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr
    monkeypatch.setitem(sys.modules, "deepspeed", None)
    with pytest.raises(
        MissingExtraError,
        match=r"^sharding.engine: deepspeed needs deepspeed, which is not "
        r"installed: pip install 'metascale\[deepspeed\]'$",
    ):
        check("deepspeed")


def test_a_missing_dependency_of_an_extra_names_both(monkeypatch):
    def broken(name, *args):
        raise ModuleNotFoundError("No module named 'hjson'", name="hjson")

    monkeypatch.setattr("importlib.import_module", broken)
    with pytest.raises(
        MissingExtraError,
        match=r"needs deepspeed, which is not installed \(hjson is missing\): "
        r"pip install 'metascale\[deepspeed\]'",
    ):
        require("deepspeed")


def test_a_sharded_run_without_deepspeed_stops_before_ray_with_one_line(cli, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)
    spec = {
        "model": {"name": "vit", "dim": 32, "depth": 2, "heads": 2},
        "data": {"source": "synthetic", "ways": 3, "shots": 2, "queries": 2},
        "algorithm": {"name": "fomaml", "inner": {"steps": 1, "lr": 0.1}},
        "outer": {"steps": 2},
        "checkpoint": {"dir": str(tmp_path / "ckpt")},
        "logging": {"wandb": {"mode": "disabled"}},
        "sharding": {"engine": "deepspeed", "ranks": 2},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    code, out, err = cli("run", str(path))
    assert code == 1 and out == ""
    ray = sys.modules.get("ray")
    assert ray is None or not ray.is_initialized()  # it stopped before Ray started
    assert err == (
        "error: sharding.engine: deepspeed needs deepspeed, which is not installed: "
        "pip install 'metascale[deepspeed]'\n"
    )


def test_a_k8s_verb_without_the_kubernetes_client_is_one_line_naming_the_extra(cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "kubernetes", None)
    code, out, err = cli("status", "job-abc123", "--to", "k8s://ml")
    assert code == 1 and err == (
        "error: a KubeRay target (--to k8s://...) needs kubernetes, which is not installed: "
        "pip install 'metascale[k8s]'\n"
    )
