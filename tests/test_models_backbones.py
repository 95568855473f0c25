"""A user's own backbone by import path (`model.name: custom`) and `model.init_from`: the backbone meta-trains under
MAML with the vmap meta-gradient equal to the per-task one, its batch norm runs per task, and a weights file loads
into the model (or is refused in one line)."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
import yaml
from safetensors.torch import save_file
from torch import nn

from metascale.algorithms import build_algorithm
from metascale.algorithms.executor import meta_gradient
from metascale.cluster import checkpoint
from metascale.cluster.coordinator import Coordinator
from metascale.config import AlgorithmSpec, CustomModelSpec, InnerLoopSpec, SyntheticImagesData
from metascale.data import build_task_source
from metascale.errors import ModelError, SpecError
from metascale.models import build_model
from metascale.models.custom import per_task_norm
from metascale.models.norm import TaskBatchNorm, TaskLayerNorm
from metascale.train import train

MODULE = "user_backbones"
SOURCE = textwrap.dedent('''
    """A researcher's own backbones, the way timm builds them: batch norm with running statistics, `num_features`."""
    import torch
    from torch import nn


    class TinyResNet(nn.Module):
        def __init__(self, in_chans=1, width=8):
            super().__init__()
            self.num_features = width
            self.stem = nn.Sequential(nn.Conv2d(in_chans, width, 3, stride=2, padding=1, bias=False),
                                      nn.BatchNorm2d(width), nn.ReLU())
            self.conv = nn.Conv2d(width, width, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(width)

        def forward(self, x):
            h = self.stem(x)
            return torch.relu(h + self.bn(self.conv(h))).mean(dim=(2, 3))


    def tiny_resnet(**kwargs):
        return TinyResNet(**kwargs)


    class TinyMixer(nn.Module):
        """Patches, then a layer norm whose input depends on earlier weights, as in a transformer."""

        def __init__(self, in_chans=1, width=8):
            super().__init__()
            self.num_features = width
            self.patch = nn.Conv2d(in_chans, width, 7, stride=7)
            self.norm = nn.LayerNorm(width)

        def forward(self, x):
            return torch.tanh(self.norm(self.patch(x).flatten(2).transpose(1, 2))).mean(dim=1)


    def broken(**kwargs):
        raise RuntimeError("width must be even")


    NOT_CALLABLE = 3
''')
QUICK = {
    "outer__steps": 2,
    "checkpoint__every": 1,
    "eval__every": 0,
    "eval__final_episodes": 2,
    "cluster__address": "inline",
}


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """`user_backbones` importable from a folder of the test's own, as a user's package would be."""
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / f"{MODULE}.py").write_text(SOURCE)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, MODULE, raising=False)
    yield
    sys.modules.pop(MODULE, None)


def _custom(**kw) -> dict:
    return {"name": "custom", "target": f"{MODULE}:tiny_resnet", "kwargs": {"in_chans": 1, "width": 6}, **kw}


def test_batch_norm_becomes_per_task_with_its_weights(user_module):
    torch.manual_seed(0)
    import user_backbones

    original = user_backbones.TinyResNet(width=6)
    with torch.no_grad():
        original.bn.weight.uniform_(0.5, 1.5)
    torch.manual_seed(0)
    model = build_model(CustomModelSpec(**_custom()), 5)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert sum(isinstance(m, TaskBatchNorm) for m in model.modules()) == 2
    assert list(dict(model.named_buffers())) == []  # no running statistics left to write under vmap
    assert model.feature_dim == 6 and model.head.out_features == 5  # from the module's `num_features`
    x = torch.randn(7, 1, 28, 28)
    assert model(x, embed=True).shape == (7, 6) and model(x).shape == (7, 5)


@pytest.mark.parametrize("name", ["maml", "anil", "protonet"])
def test_vmapped_meta_gradient_equals_per_task_for_a_custom_backbone(float64, user_module, name):
    torch.manual_seed(0)
    model = build_model(CustomModelSpec(**_custom()), 5).double()
    alg = build_algorithm(AlgorithmSpec(name=name, inner=InnerLoopSpec(steps=3, lr=0.1)), model)
    meta = alg.init(dict(model.named_parameters()))
    source = build_task_source(SyntheticImagesData(ways=5, shots=1, queries=3), "train", 0)
    batch = source.batch(0, range(3)).to("cpu", torch.float64)
    per_task = meta_gradient(alg, meta, batch, "per_task")
    vmapped = meta_gradient(alg, meta, batch, "vmap")
    assert (per_task.strategy, vmapped.strategy) == ("per_task", "vmap")
    assert any(float(g.abs().max()) > 0 for k, g in per_task.grads.items() if k.startswith("body."))
    for k in meta:
        assert torch.allclose(per_task.grads[k], vmapped.grads[k], rtol=0, atol=1e-10), k


def test_layer_norm_becomes_exact_under_vmap_with_its_weights(float64, user_module):
    """A plain nn.LayerNorm gives vmap a wrong second-order meta-gradient (models/norm.py, TaskLayerNorm)."""
    import user_backbones

    mixer = user_backbones.TinyMixer(width=6)
    with torch.no_grad():
        mixer.norm.weight.uniform_(0.5, 1.5)
        mixer.norm.bias.uniform_(-0.5, 0.5)
    weights = {k: v.clone() for k, v in mixer.norm.state_dict().items()}
    swapped = per_task_norm(mixer).norm
    assert type(swapped) is TaskLayerNorm and swapped.eps == 1e-5
    assert all(torch.equal(swapped.state_dict()[k], v) for k, v in weights.items())
    torch.manual_seed(0)
    model = build_model(CustomModelSpec(**_custom(target=f"{MODULE}:TinyMixer")), 5).double()
    alg = build_algorithm(AlgorithmSpec(name="maml", inner=InnerLoopSpec(steps=2, lr=0.5)), model)
    meta = alg.init(dict(model.named_parameters()))
    batch = build_task_source(SyntheticImagesData(ways=5, shots=1, queries=3), "train", 0).batch(0, range(2))
    batch = batch.to("cpu", torch.float64)
    per_task = meta_gradient(alg, meta, batch, "per_task")
    vmapped = meta_gradient(alg, meta, batch, "vmap")
    assert vmapped.strategy == "vmap"
    for k in meta:
        assert torch.allclose(per_task.grads[k], vmapped.grads[k], rtol=1e-8, atol=1e-12), k


def test_custom_backbone_meta_trains_under_maml_identically_per_task_and_vmap(user_module, tmp_path, make_job):
    finals = []
    for strategy in ("per_task", "vmap"):
        spec = make_job(
            tmp_path / strategy, **{**QUICK, "outer__steps": 3}, model=_custom(), executor__strategy=strategy
        )
        train(spec)
        finals.append(checkpoint.load_latest(spec.path(spec.checkpoint.dir))[1]["params"])
    torch.manual_seed(0)
    start = dict(build_model(spec.model, 3).double().named_parameters())  # the run's initialisation (seed 0)
    assert any(not torch.equal(finals[0][k], start[k].detach()) for k in start)  # it learned
    for k in start:
        assert torch.allclose(finals[0][k], finals[1][k], rtol=0, atol=1e-9), k


@pytest.mark.parametrize(
    "target, expected",
    [
        ("no_such_package.models:Net", "cannot import no_such_package.models (ModuleNotFoundError"),
        (f"{MODULE}:TinyResNett", f"{MODULE} has no attribute 'TinyResNett'"),
        (f"{MODULE}:NOT_CALLABLE", "is a int, not a class or factory"),
        (f"{MODULE}:broken", "failed: RuntimeError: width must be even"),
    ],
)
def test_a_target_that_cannot_build_is_one_line(user_module, target, expected):
    with pytest.raises(ModelError) as e:
        build_model(CustomModelSpec(**_custom(target=target)), 5)
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_a_module_without_a_feature_size_asks_for_feature_dim(user_module):
    spec = {"name": "custom", "target": "torch.nn:Flatten"}
    with pytest.raises(ModelError, match="set model.feature_dim"):
        build_model(CustomModelSpec(**spec), 5)
    assert build_model(CustomModelSpec(**spec, feature_dim=784), 5)(torch.randn(2, 1, 28, 28)).shape == (2, 5)


@pytest.mark.parametrize(
    "field, value",
    [("target", "user_backbones.tiny_resnet"), ("target", "a b:c"), ("target", "pkg:"), ("init_into", "body/stem")],
)
def test_malformed_paths_are_refused_by_the_spec(make_job, tmp_path, field, value):
    with pytest.raises(SpecError) as e:
        make_job(tmp_path, model=_custom(**{field: value}))
    assert f"model.custom.{field}" in str(e.value) or f"model.{field}" in str(e.value)


def _coordinator(make_job, tmp_path, **model):
    return Coordinator(make_job(tmp_path, **QUICK, model=model))


@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
def test_init_from_loads_a_saved_state_dict(make_job, tmp_path, fmt):
    torch.manual_seed(123)
    saved = build_model(make_job(tmp_path).model, 3).double().state_dict()
    path = tmp_path / f"w.{'pt' if fmt == 'torch' else 'safetensors'}"
    torch.save(saved, path) if fmt == "torch" else save_file(saved, str(path))
    coord = _coordinator(make_job, tmp_path, name="conv4", hidden=8, init_from=str(path))
    assert any(not torch.equal(coord.params[k], saved[k]) for k in saved)  # seed 0 differs from seed 123
    assert coord.init_from_file() == len(saved)
    for k, v in saved.items():
        assert torch.equal(coord.params[k], v), k


def test_a_pretrained_backbone_gets_a_new_n_way_head(make_job, tmp_path, user_module):
    """A backbone's own state_dict (with batch-norm running statistics) into `body`, and a file whose head has
    another number of classes into the whole model: the head keeps its initialisation, everything else loads."""
    import user_backbones

    torch.manual_seed(7)
    backbone = user_backbones.TinyResNet(width=6).double()
    path = tmp_path / "backbone.pt"
    torch.save(backbone.state_dict(), path)
    coord = _coordinator(make_job, tmp_path, **_custom(init_from=str(path), init_into="body"))
    head = {k: v.clone() for k, v in coord.params.items() if k.startswith("head.")}
    assert coord.init_from_file() == len(dict(backbone.named_parameters()))
    for k, v in backbone.named_parameters():
        assert torch.equal(coord.params[f"body.{k}"], v.detach()), k
    assert all(torch.equal(coord.params[k], v) for k, v in head.items())

    whole = {f"body.{k}": v for k, v in backbone.state_dict().items()}
    whole.update({"head.weight": torch.zeros(64, 6), "head.bias": torch.zeros(64)})  # a 64-class pretraining head
    torch.save(whole, path)
    coord = _coordinator(make_job, tmp_path, **_custom(init_from=str(path)))
    head = {k: v.clone() for k, v in coord.params.items() if k.startswith("head.")}
    coord.init_from_file()
    assert all(torch.equal(coord.params[k], v) for k, v in head.items()) and head["head.weight"].shape == (3, 6)
    assert torch.equal(coord.params["body.conv.weight"], backbone.conv.weight.detach())


def test_a_mismatched_file_is_refused_in_one_line(make_job, tmp_path):
    torch.manual_seed(0)
    saved = build_model(make_job(tmp_path).model, 3).state_dict()
    saved.pop("body.0.weight")
    saved["body.3.weight"] = torch.zeros(3, 3)  # conv weight of the wrong shape
    saved.update({f"extra.{i}": torch.zeros(1) for i in range(6)})
    path = tmp_path / "bad.pt"
    torch.save(saved, path)
    coord = _coordinator(make_job, tmp_path, name="conv4", hidden=8, init_from=str(path))
    before = {k: v.clone() for k, v in coord.params.items()}
    with pytest.raises(ModelError) as e:
        coord.init_from_file()
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    assert "1 missing (body.0.weight)" in msg
    assert "6 unexpected (extra.0, extra.1, extra.2, extra.3, ... 2 more)" in msg
    assert "body.3.weight (3, 3) vs (8, 8, 3, 3)" in msg
    assert all(torch.equal(coord.params[k], v) for k, v in before.items())  # nothing half-loaded


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"not a pickle", "not a readable torch state dict"),
        ({"model": {"w": 1}}, "not a flat state dict of tensors (dict with keys model)"),
        (None, "no such file"),
    ],
)
def test_an_unreadable_file_is_one_line(make_job, tmp_path, content, expected):
    path = tmp_path / "w.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    coord = _coordinator(make_job, tmp_path, name="conv4", hidden=8, init_from=str(path))
    with pytest.raises(ModelError) as e:
        coord.init_from_file()
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_a_run_starts_from_init_from_and_refuses_a_bad_file_before_training(make_job, tmp_path, cli):
    spec = make_job(
        tmp_path, **QUICK, model={"name": "conv4", "hidden": 8, "init_from": str(tmp_path / "w.pt")}, outer__lr=1e-12
    )
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    torch.save({"head.weight": torch.zeros(3, 8)}, tmp_path / "w.pt")
    code, _, err = cli("run", str(job))
    assert code == 2 and "model.init_from" in err and "missing" in err
    assert not checkpoint.list_steps(spec.path(spec.checkpoint.dir))

    torch.manual_seed(5)
    saved = build_model(spec.model, 3).double().state_dict()
    torch.save(saved, tmp_path / "w.pt")
    code, _, err = cli("run", str(job))
    assert code == 0, err
    params = checkpoint.load_latest(spec.path(spec.checkpoint.dir))[1]["params"]
    for k, v in saved.items():  # a meta-step of lr 1e-12 moves nothing measurably
        assert torch.allclose(params[k], v, rtol=0, atol=1e-9), k


def test_a_spec_with_a_custom_model_and_init_from_validates(tmp_path, cli, user_module):
    job = tmp_path / "job.yaml"
    job.write_text(
        yaml.safe_dump(
            {
                "name": "pmf",
                "model": _custom(init_from="weights/backbone.safetensors", init_into="body"),
                "data": {"source": "synthetic", "ways": 5, "shots": 1, "queries": 3},
                "algorithm": {"name": "protonet"},
            }
        )
    )
    code, out, err = cli("validate", str(job))
    assert code == 0, err
    model = yaml.safe_load(out)["model"]
    assert model["target"] == f"{MODULE}:tiny_resnet" and model["init_into"] == "body"
    assert model["kwargs"] == {"in_chans": 1, "width": 6} and model["feature_dim"] is None
    job.write_text(job.read_text().replace(f"{MODULE}:tiny_resnet", f"{MODULE}.tiny_resnet"))
    code, _, err = cli("validate", str(job))
    assert code == 2 and "is not an import path 'package.module:ClassOrFactory'" in err


def test_the_documented_pmf_recipe_is_a_valid_spec():
    from pathlib import Path

    from metascale.config import parse_spec

    page = (Path(__file__).resolve().parent.parent / "docs" / "survey-map.md").read_text()
    section = page.split("## Pretrained backbone + ProtoNets", 1)[1]
    spec = parse_spec(yaml.safe_load(section.split("```yaml", 1)[1].split("```", 1)[0]))
    assert (spec.model.name, spec.model.init_into, spec.algorithm.name) == ("custom", "body", "protonet")
