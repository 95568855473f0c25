"""`metascale export RUN_OR_CHECKPOINT --to model.safetensors`: the model's weights alone, under its state_dict()
keys, loadable with `load_state_dict(strict=True)`; meta-parameters that are not weights stay out; buffers come as the
model builds them."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from metascale.cluster import checkpoint
from metascale.data import output_dim
from metascale.models import MODELS, build_model
from metascale.models.mlp import MLP
from metascale.train import train

QUICK = {
    "outer__steps": 2,
    "checkpoint__every": 1,
    "eval__every": 0,
    "eval__final_episodes": 2,
    "cluster__address": "inline",
}


def _trained(make_job, tmp_path, **kw):
    spec = make_job(tmp_path, **{**QUICK, **kw})
    train(spec)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    return spec, path


def _fresh_model(spec) -> nn.Module:
    return build_model(spec.model, output_dim(spec.data)).to(getattr(torch, spec.executor.dtype))


def test_export_of_a_job_loads_into_its_model_strictly(tmp_path, make_job, cli):
    spec, path = _trained(make_job, tmp_path)
    out = tmp_path / "out" / "model.safetensors"
    code, stdout, err = cli("export", str(path), "--to", str(out))
    assert code == 0, err
    line = json.loads(stdout.strip().splitlines()[-1])
    assert line["step"] == 2 and line["buffers"] == 0 and line["exported"] == str(out)
    weights = load_file(out)
    model = _fresh_model(spec)
    assert sorted(weights) == sorted(model.state_dict())  # the model's own keys, nothing else
    model.load_state_dict(weights, strict=True)
    _, state = checkpoint.load_latest(spec.path(spec.checkpoint.dir))
    for k, v in model.state_dict().items():
        assert torch.equal(v, state["params"][k]), k
    with safe_open(out, "pt") as f:
        meta = f.metadata()
    assert (
        meta["format"] == "pt"
        and meta["metascale.step"] == "2"
        and json.loads(meta["metascale.model"])["name"] == "conv4"
    )


def test_export_of_a_checkpoint_leaves_out_meta_parameters_that_are_not_weights(tmp_path, make_job, cli):
    """Meta-SGD learns a rate per weight: those are meta-parameters, not the model's; the checkpoint's recorded spec
    is enough to name the rest (no job spec given)."""
    spec, _ = _trained(make_job, tmp_path, algorithm__name="metasgd")
    step_folder = f"{spec.path(spec.checkpoint.dir)}/step-00000002"
    assert any(k.startswith("lr.") for k in checkpoint.read(step_folder)["params"])
    out = tmp_path / "m.safetensors"
    for source in (step_folder, spec.path(spec.checkpoint.dir)):  # one checkpoint, or a run's directory
        code, _, err = cli("export", source, "--to", str(out))
        assert code == 0, err
        weights = load_file(out)
        assert not any(k.startswith("lr.") for k in weights)
        _fresh_model(spec).load_state_dict(weights, strict=True)


class MLPWithBuffers(MLP):
    """An MLP with a persistent buffer its forward uses, and a non-persistent one (not part of a state_dict)."""

    def __init__(self, spec, out_features):
        super().__init__(spec, out_features)
        self.register_buffer("out_scale", torch.full((out_features,), 0.5))
        self.register_buffer("scratch", torch.zeros(3), persistent=False)

    def forward(self, x, embed=False):
        out = super().forward(x, embed)
        return out if embed else out * self.out_scale


def test_buffers_are_exported_as_the_model_builds_them(tmp_path, make_job, cli, monkeypatch):
    monkeypatch.setitem(MODELS, "mlp", MLPWithBuffers)
    spec, path = _trained(
        make_job,
        tmp_path,
        model={"name": "mlp", "hidden": [8, 8]},
        data={"source": "sinusoid", "shots": 5, "queries": 5},
    )
    out = tmp_path / "m.safetensors"
    code, stdout, err = cli("export", str(path), "--to", str(out))
    assert code == 0, err
    assert json.loads(stdout.strip().splitlines()[-1])["buffers"] == 1
    weights = load_file(out)
    assert "out_scale" in weights and "scratch" not in weights
    model = _fresh_model(spec)
    model.load_state_dict(weights, strict=True)
    assert torch.equal(model.out_scale, torch.full((1,), 0.5, dtype=torch.float64))
    _, state = checkpoint.load_latest(spec.path(spec.checkpoint.dir))
    assert "out_scale" not in state["params"]  # never a meta-parameter: held fixed by every worker
    trained = {k: v for k, v in model.state_dict().items() if k != "out_scale"}
    assert trained.keys() == state["params"].keys()
    assert any(not torch.equal(v, _fresh_model(spec).state_dict()[k]) for k, v in trained.items())  # it learned
    for k, v in trained.items():
        assert torch.equal(v, state["params"][k]), k


@pytest.mark.parametrize("what", ["untrained job", "not a checkpoint"])
def test_export_of_something_without_a_checkpoint_is_one_line(tmp_path, make_job, cli, what):
    spec = make_job(tmp_path, **QUICK)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    source = str(path) if what == "untrained job" else str(tmp_path / "nothing")
    code, out, err = cli("export", source, "--to", str(tmp_path / "m.safetensors"))
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert ("no readable checkpoint in" if what == "untrained job" else "no such checkpoint") in err
    assert not (tmp_path / "m.safetensors").exists()
