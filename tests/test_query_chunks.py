"""The chunked query pass (algorithms/query_chunks.py) gives the whole pass's loss, outputs and gradients, per-task
batch norm included, and MAML's meta-gradient through it equals the plain one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from metascale.algorithms import build_algorithm
from metascale.algorithms.base import Functional, task_loss
from metascale.algorithms.executor import meta_gradient
from metascale.algorithms.norm_chunks import ChunkedBlock
from metascale.algorithms.query_chunks import _Segments, chunked_query
from metascale.config import (
    AlgorithmSpec,
    Conv4Spec,
    InnerLoopSpec,
    MLPSpec,
    ResNet12Spec,
    SinusoidData,
    SyntheticImagesData,
    ViTSpec,
    parse_spec,
)
from metascale.data import build_task_source
from metascale.errors import SpecError
from metascale.models import build_model
from metascale.models.checkpointing import run_blocks
from metascale.models.norm import TaskBatchNorm

MODELS = {
    "conv4-omniglot": Conv4Spec(hidden=8),
    "conv4-miniimagenet": Conv4Spec(variant="miniimagenet", hidden=8),
    "resnet12": ResNet12Spec(in_channels=1, channels=[4, 4]),
    "vit": ViTSpec(dim=16, depth=2, heads=2),
}


def _images(n=2, queries=3):
    spec = SyntheticImagesData(ways=5, shots=1, queries=queries, image_size=28)
    return build_task_source(spec, "train", 0).batch(0, range(n)).to("cpu", torch.float64)


def _rel(a: dict, b: dict) -> float:
    """Largest difference relative to the gradient's overall size (a bias before batch norm has a zero gradient)."""
    scale = max(float(v.abs().max()) for v in a.values())
    return max(float((a[k] - b[k]).abs().max()) for k in a) / scale


def _whole_and_chunked(model, x, y, chunk):
    f = Functional(model)
    params = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    out = f(params, x)
    loss = task_loss(out, y)
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    c_loss, c_out = chunked_query(f, params, x, y, chunk)
    c_grads = dict(zip(params, torch.autograd.grad(c_loss, list(params.values()))))
    return (loss, out, grads), (c_loss, c_out, c_grads)


@pytest.mark.parametrize("chunk", [2, 4, 15])  # 15: the whole query set, so every segment runs whole
@pytest.mark.parametrize("name", list(MODELS))
def test_chunked_query_pass_equals_the_whole_pass(float64, name, chunk):
    torch.manual_seed(0)
    model = build_model(MODELS[name], 5).double()
    task = _images(1).tasks()[0]
    (loss, out, grads), (c_loss, c_out, c_grads) = _whole_and_chunked(model, task.query_x, task.query_y, chunk)
    assert abs(float((loss - c_loss).detach())) < 1e-12 and float((out - c_out).detach().abs().max()) < 1e-12
    assert _rel(grads, c_grads) < 1e-10
    assert not c_out.requires_grad  # outputs are for metrics; only the loss carries the gradient


@pytest.mark.parametrize("name", ["conv4-omniglot", "resnet12"])
def test_chunked_query_pass_runs_its_blocks_under_the_models_bf16_autocast(name):
    """Under bf16 autocast the chunked pass's blocks run in bf16, as the whole pass's do: its gradients are the whole
    bf16 pass's to bf16's precision (measured 0.37% and 1.4% apart), while bf16 is 6.2% and 9.1% from float32 here.
    Once the blocks ran in float32: the chunked pass was 0.2% from float32 and 6-9% from the whole bf16 pass."""
    torch.manual_seed(0)
    model = build_model(MODELS[name], 5)
    params = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    task = _images(1).tasks()[0].to("cpu", torch.float32)

    def flat(loss: torch.Tensor) -> torch.Tensor:
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(params.values()))])

    fp32 = flat(task_loss(Functional(model)(params, task.query_x), task.query_y))
    whole = flat(task_loss(Functional(model, bf16=True)(params, task.query_x), task.query_y))
    chunked = flat(chunked_query(Functional(model, bf16=True), params, task.query_x, task.query_y, 4)[0])
    assert float((whole - fp32).norm() / fp32.norm()) > 0.05  # bf16 is far enough from float32 to tell them apart
    assert float((chunked - whole).norm() / whole.norm()) < 0.03


class _StemAndBlocks(nn.Module):
    """A backbone with a stem before its blocks and batch norm both inside them and in none of them: the query pass's
    stem runs in chunks of its own, the tail on the last boundary."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, stride=2)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), TaskBatchNorm(4), nn.ReLU()) for _ in "ab"
        )
        self.head = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor, embed: bool = False) -> torch.Tensor:
        return self.head(run_blocks(self.blocks, self.stem(x)).mean(dim=(2, 3)))


def _no_blocks() -> nn.Module:
    """Batch norm without `run_blocks`: the whole model is one segment."""
    net = nn.Sequential(nn.Conv2d(1, 4, 3), TaskBatchNorm(4), nn.ReLU(), nn.Conv2d(4, 4, 3), TaskBatchNorm(4))
    return nn.Sequential(net, nn.Flatten(), nn.LazyLinear(5))


@pytest.mark.parametrize("name", ["stem_and_blocks", "no_blocks"])
def test_chunked_query_pass_on_other_backbones(float64, name):
    torch.manual_seed(0)
    model = (_StemAndBlocks() if name == "stem_and_blocks" else _no_blocks()).double()
    task = _images(1).tasks()[0]
    with torch.no_grad():
        model(task.query_x[:1])  # the lazy layer's shape
    if name == "no_blocks":
        model.forward = lambda x, embed=False, m=model: nn.Sequential.forward(m, x)
    (loss, out, grads), (c_loss, c_out, c_grads) = _whole_and_chunked(model, task.query_x, task.query_y, 4)
    assert abs(float((loss - c_loss).detach())) < 1e-12 and float((out - c_out).detach().abs().max()) < 1e-12
    assert _rel(grads, c_grads) < 1e-10


@pytest.mark.parametrize("name, segments", [("conv4-omniglot", 4), ("resnet12", 2), ("vit", 1)])
def test_boundaries_are_kept_at_stages_only(name, segments):
    """ResNet-12's parts hand on tuples within a stage: its boundaries are kept per stage (2 here), Conv-4's per
    layer; the ViT has no batch norm, so nothing links its chunks and it runs as one segment, keeping nothing."""
    model = build_model(MODELS[name], 5)
    x = _images(1).tasks()[0].query_x.float()
    assert len(_Segments(Functional(model), dict(model.named_parameters()), x, 4).segments) == segments


def test_segment_chunks_grow_where_the_maps_shrink():
    """ResNet-12 at 84x84 (16-32-64-128): a stage's largest boundary (its parts hand on the stage's input beside their
    maps) holds per example 3x84x84 + 16x84x84 = 134064 numbers in the first stage, 84672 in the second, 42336 in
    the third and 19200 in the fourth. In chunks of 5 where they are largest, the stages take 5, 5*134064//84672 = 7,
    15 and 34 of the 75 queries at a time; in chunks of 20 the last stage's 139 reach the query set and it runs
    whole."""
    model = build_model(ResNet12Spec(in_channels=3, channels=[16, 32, 64, 128], image_size=84), 5)
    params, x = dict(model.named_parameters()), torch.randn(75, 3, 84, 84)
    for chunk, sizes in ((5, [5, 7, 15, 34]), (20, [20, 31, 63, None])):
        segments = _Segments(Functional(model), params, x, chunk).segments
        assert [op.size if isinstance(op, ChunkedBlock) else None for _, op in segments] == sizes


def test_chunks_with_their_own_batch_statistics_would_differ(float64):
    """Guards the test above: on these models, normalising each chunk by itself changes the numbers."""
    torch.manual_seed(0)
    model = build_model(MODELS["conv4-omniglot"], 5).double()
    x = _images(1).tasks()[0].query_x
    with torch.no_grad():
        assert float((model(x) - torch.cat([model(c) for c in x.split(4)])).abs().max()) > 1e-3


def test_regression_without_batch_norm(float64):
    torch.manual_seed(0)
    model = build_model(MLPSpec(), 1).double()
    task = build_task_source(SinusoidData(), "train", 0).batch(0, range(1)).to("cpu", torch.float64).tasks()[0]
    (loss, _, grads), (c_loss, _, c_grads) = _whole_and_chunked(model, task.query_x, task.query_y, 3)
    assert abs(float((loss - c_loss).detach())) < 1e-12 and _rel(grads, c_grads) < 1e-10


@pytest.mark.parametrize("name", ["maml", "metasgd", "learned_hparams"])
def test_meta_gradient_through_chunked_query_equals_plain(float64, name):
    """Second order through 3 inner steps: the query pass's gradient feeds the inner loop's backward unchanged.
    vmap is asked for and must fall back to the per-task path (the chunked backward has no vmap rule)."""

    def setup(**inner):
        torch.manual_seed(0)
        model = build_model(Conv4Spec(hidden=8), 5).double()
        alg = build_algorithm(AlgorithmSpec(name=name, inner=InnerLoopSpec(steps=3, lr=0.1, **inner)), model)
        return alg, alg.init(dict(model.named_parameters()))

    plain, meta = setup()
    chunked, _ = setup(checkpoint="all", query_chunk=4)
    batch = _images(2)
    a, b = meta_gradient(plain, meta, batch), meta_gradient(chunked, meta, batch, "vmap")
    assert _rel(a.grads, b.grads) < 1e-10
    assert a.metrics == pytest.approx(b.metrics, rel=1e-12)
    with torch.no_grad():  # evaluation: the chunked pass needs no graph
        task = batch.tasks()[0]
        assert float(chunked.task_objective(meta, task).objective) == pytest.approx(
            float(plain.task_objective(meta, task).objective), rel=1e-12
        )


@pytest.mark.parametrize(
    "raw, needle",
    [
        (
            {
                "algorithm": {"name": "protonet", "inner": {"query_chunk": 5}},
                "model": {"name": "conv4"},
                "data": {"source": "synthetic"},
            },
            "inner.query_chunk splits the adapted model's query pass",
        ),
        ({"algorithm": {"inner": {"query_chunk": 0}}}, "algorithm.inner.query_chunk: Input should be greater than 0"),
        (
            {
                "algorithm": {"name": "fomaml", "inner": {"query_chunk": 2}},
                "model": {"name": "vit", "dim": 32, "depth": 2, "heads": 2},
                "data": {"source": "synthetic"},
                "sharding": {"engine": "deepspeed", "ranks": 2},
            },
            "sharded 'fomaml' splits each task's examples over the ranks instead: drop query_chunk",
        ),
    ],
)
def test_bad_query_chunk_specs_are_refused(raw, needle):
    with pytest.raises(SpecError) as e:
        parse_spec(raw)
    assert any(needle in p for p in e.value.problems), e.value.problems
