"""Mixed-mode meta-gradients (algorithms/mixed_mode.py) against reverse mode's double backward under the same
strategy (per task, or vmap over tasks) and against central finite differences, float64."""

from __future__ import annotations

import math

import pytest
import torch

from metascale.algorithms import build_algorithm
from metascale.algorithms.executor import meta_gradient
from metascale.config import (
    AlgorithmSpec,
    Conv4Spec,
    InnerLoopSpec,
    MLPSpec,
    ResNet12Spec,
    SinusoidData,
    SyntheticImagesData,
    ViTSpec,
)
from metascale.data import build_task_source
from metascale.models import build_model

MODELS = {
    "conv4-omniglot": Conv4Spec(hidden=4),
    "conv4-miniimagenet": Conv4Spec(hidden=4, variant="miniimagenet"),
    "resnet12": ResNet12Spec(in_channels=1, channels=[4, 4]),
    "vit": ViTSpec(dim=8, depth=1, heads=2),
}


@pytest.fixture
def sweeps(monkeypatch):
    """Counts the mixed-mode inner loops that actually ran (not the reverse fallback), the sweep's support products
    (one per step, however taken), and the Hessian-vector products taken block by block (not over the whole model;
    one per support chunk)."""
    import metascale.algorithms.mixed_mode as mm

    count = {"n": 0, "products": 0, "chunk_products": 0, "block_products": 0, "block_grads": 0, "kept_copies": 0,
             "chunked_blocks": 0}  # fmt: skip
    real, real_product, real_support_product = mm._MixedDescent.apply, mm.grad_and_product, mm._Support.product

    def counting(*args):
        count["n"] += 1
        out = real(*args)
        count["kept_copies"] += len(out) // len(args[1]) - 1  # outputs: phi_K, then the kept weights
        return out

    def counting_products(*args, chunks=None):
        # with the tangent u a product; without, a plain gradient (the forward loop's, or a recomputed step's)
        count["block_products" if args[-1] is not None else "block_grads"] += 1
        count["chunked_blocks"] += any(chunks or [])  # blocks in chunks, their batch statistics explicit
        return real_product(*args, chunks=chunks)

    def counting_support_products(*args):
        count["products"] += 1
        count["chunk_products"] += len(args[0].parts)  # the support chunks it sums over
        return real_support_product(*args)

    monkeypatch.setattr(mm._MixedDescent, "apply", counting)
    monkeypatch.setattr(mm._Support, "product", counting_support_products)
    monkeypatch.setattr(mm, "grad_and_product", counting_products)
    return count


def _images(n=2):
    spec = SyntheticImagesData(ways=5, shots=1, queries=3, image_size=28)
    return build_task_source(spec, "train", 0).batch(0, range(n)).to("cpu", torch.float64)


def _sinusoid(n=2):
    return build_task_source(SinusoidData(), "train", 0).batch(0, range(n)).to("cpu", torch.float64)


def _setup(name, model_spec, out, steps, lr=0.1, seed=0, **inner):
    """The same meta-parameters for both modes (same seed), so that their meta-gradients can be compared."""
    algs = []
    for mode in ("reverse", "mixed"):
        torch.manual_seed(seed)
        model = build_model(model_spec, out).double()
        spec = AlgorithmSpec(name=name, inner=InnerLoopSpec(steps=steps, lr=lr, differentiation=mode, **inner))
        algs.append(build_algorithm(spec, model))
    meta = algs[0].init(dict(algs[0].f.model.named_parameters()))
    if name == "learned_hparams":  # a non-zero decay, so that its hypergradient's second-order term is exercised
        meta = {k: torch.full_like(v, 0.05) if k.startswith("hparams.wd.") else v for k, v in meta.items()}
    return algs[0], algs[1], meta


def _relative(a, b) -> float:
    num = sum(float(((a[k] - b[k]) ** 2).sum()) for k in a) ** 0.5
    return num / sum(float((a[k] ** 2).sum()) for k in a) ** 0.5


@pytest.mark.parametrize("strategy", ["per_task", "vmap"])
@pytest.mark.parametrize("steps", [1, 5])
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("name", ["maml", "metasgd", "learned_hparams"])
@pytest.mark.parametrize("blocks", [True, False])
def test_mixed_equals_reverse(float64, sweeps, blocks, name, model, steps, strategy):
    """Block-by-block products (`mixed_blocks`, the default) and whole-model ones against reverse mode."""
    reverse, mixed, meta = _setup(name, MODELS[model], 5, steps, mixed_blocks=blocks)
    batch = _images()
    expected = meta_gradient(reverse, meta, batch, strategy)
    assert expected.strategy == strategy and sweeps["n"] == 0
    got = meta_gradient(mixed, meta, batch, strategy)
    assert got.strategy == strategy  # vmap ran, no silent per-task fallback
    assert sweeps["n"] == (1 if strategy == "vmap" else len(batch))
    assert sweeps["products"] == steps * sweeps["n"]  # one product per step
    # every model here has blocks: taken one at a time unless `mixed_blocks` is off
    assert sweeps["block_products"] == (steps * sweeps["n"] if blocks else 0)
    assert _relative(expected.grads, got.grads) < 1e-8
    for k in meta:  # every meta-parameter, hyperparameters included, and none trivially zero in both
        assert torch.allclose(expected.grads[k], got.grads[k], rtol=1e-7, atol=1e-12), k
    assert abs(expected.metrics["loss"] - got.metrics["loss"]) < 1e-10


@pytest.mark.parametrize("strategy", ["per_task", "vmap"])
@pytest.mark.parametrize("stride", [2, 3, 7])
@pytest.mark.parametrize("model", ["conv4-miniimagenet", "vit"])
@pytest.mark.parametrize("name", ["metasgd", "learned_hparams"])
def test_mixed_stride_recomputes_the_same_meta_gradient(float64, sweeps, name, model, stride, strategy):
    """Keeping every 2nd/3rd step's weights (stretches of 2 and 1, 3 and 2 steps over 5) or only phi_0 (stride above
    the step count) and recomputing the rest in the sweep gives the same numbers as reverse mode."""
    reverse, _, meta = _setup(name, MODELS[model], 5, steps=5)
    _, mixed, _ = _setup(name, MODELS[model], 5, steps=5, mixed_stride=stride)
    batch = _images()
    expected = meta_gradient(reverse, meta, batch, "per_task").grads
    got = meta_gradient(mixed, meta, batch, strategy).grads
    assert sweeps["n"] == (1 if strategy == "vmap" else len(batch))
    n, kept = sweeps["n"], math.ceil(5 / stride)  # phi_0 (an input), phi_s, phi_2s, ... below step 5
    assert sweeps["block_products"] == 5 * n and sweeps["kept_copies"] == (kept - 1) * n
    assert sweeps["block_grads"] == (5 + 5 - kept) * n  # the forward's 5, and the sweep's recomputed steps
    assert _relative(expected, got) < 1e-8


@pytest.mark.parametrize("strategy", ["per_task", "vmap"])
@pytest.mark.parametrize("name", ["maml", "metasgd", "learned_hparams", "learned_loss"])
@pytest.mark.parametrize("blocks", [True, False])
def test_support_chunks_sum_to_the_whole_support_sets_meta_gradient(float64, sweeps, blocks, name, strategy):
    """Chunks of 2, 2 and 1 of the 5 support examples (uneven, so their weights matter): the ViT's products and
    gradients run once per chunk, block by block or over the whole model, and the meta-gradient is reverse mode's
    and unchunked mixed mode's."""
    reverse, whole, meta = _setup(name, MODELS["vit"], 5, steps=3, mixed_blocks=blocks)
    _, chunked, _ = _setup(name, MODELS["vit"], 5, steps=3, support_chunk=2, mixed_blocks=blocks)
    batch = _images()
    expected = meta_gradient(reverse, meta, batch, strategy).grads
    unchunked = meta_gradient(whole, meta, batch, strategy).grads
    got = meta_gradient(chunked, meta, batch, strategy)
    assert got.strategy == strategy
    products, chunk_products = sweeps["products"] // 2, sweeps["chunk_products"]
    assert chunk_products - products == 3 * products  # 3 chunks, 3 steps, every task
    assert sweeps["block_products"] == (chunk_products if blocks else 0)
    assert _relative(expected, got.grads) < 1e-8 and _relative(unchunked, got.grads) < 1e-8
    for k in meta:  # hyperparameters and the learned loss's network included
        assert torch.allclose(expected[k], got.grads[k], rtol=1e-7, atol=1e-12), k


@pytest.mark.parametrize(("steps", "chunk", "strategy"), [(1, 2, "per_task"), (3, 3, "per_task"), (3, 2, "vmap")])
@pytest.mark.parametrize("model", ["conv4-omniglot", "conv4-miniimagenet", "resnet12"])
@pytest.mark.parametrize("name", ["maml", "metasgd", "learned_hparams"])
def test_support_chunks_under_batch_norm_equal_the_whole_support_set(float64, sweeps, name, model, steps, chunk,
                                                                     strategy):  # fmt: skip
    """Per-task batch norm couples the 5 support examples: each block runs in chunks of 2 (2, 2, 1) or 3 (3, 2) with
    its statistics explicit, and the meta-gradient is reverse mode's and unchunked mixed mode's. Dropping the
    statistics' adjoint (norm_chunks.ChunkedBlock.pullback's second loop) leaves ~50% relative error on ResNet-12."""
    reverse, whole, meta = _setup(name, MODELS[model], 5, steps)
    _, chunked, _ = _setup(name, MODELS[model], 5, steps, support_chunk=chunk)
    batch = _images()
    expected = meta_gradient(reverse, meta, batch, strategy).grads
    unchunked = meta_gradient(whole, meta, batch, strategy).grads
    assert sweeps["chunked_blocks"] == 0
    got = meta_gradient(chunked, meta, batch, strategy)
    assert got.strategy == strategy
    tasks = 1 if strategy == "vmap" else len(batch)
    assert sweeps["chunked_blocks"] == 2 * steps * tasks  # the forward's gradients and the sweep's products
    assert _relative(expected, got.grads) < 1e-8 and _relative(unchunked, got.grads) < 1e-8
    for k in meta:
        assert torch.allclose(expected[k], got.grads[k], rtol=1e-7, atol=1e-12), k


@pytest.mark.parametrize("blocks", [True, False])
def test_support_chunks_under_batch_norm_with_a_stride(float64, sweeps, blocks):
    """The sweep's recomputed steps (stride 2 of 5) take the same chunked gradients as the forward loop's; without
    `mixed_blocks` (refused by the config with chunks here) the chunks still run block by block, since whole-model
    chunks would split the batch statistics."""
    reverse, _, meta = _setup("metasgd", MODELS["resnet12"], 5, steps=5)
    _, chunked, _ = _setup("metasgd", MODELS["resnet12"], 5, steps=5, support_chunk=2, mixed_stride=2,
                           mixed_blocks=blocks)  # fmt: skip
    batch = _images()
    expected = meta_gradient(reverse, meta, batch).grads
    got = meta_gradient(chunked, meta, batch).grads
    assert sweeps["chunked_blocks"] == (5 + 5 + 2) * len(batch)  # 5 gradients, 5 products, 2 recomputed gradients
    assert _relative(expected, got) < 1e-8


@pytest.mark.parametrize("strategy", ["per_task", "vmap"])
def test_support_chunks_without_blocks_sum_the_whole_model_products(float64, sweeps, strategy):
    """The MLP has no blocks: each chunk takes one whole-model product (chunks of 3 of the sinusoid's support set)."""
    reverse, _, meta = _setup("metasgd", MLPSpec(), 1, steps=2)
    _, chunked, _ = _setup("metasgd", MLPSpec(), 1, steps=2, support_chunk=3)
    batch = _sinusoid()
    assert batch.support_x.shape[1] % 3  # an uneven last chunk
    expected = meta_gradient(reverse, meta, batch, strategy).grads
    got = meta_gradient(chunked, meta, batch, strategy).grads
    assert sweeps["n"] and sweeps["block_products"] == 0
    assert _relative(expected, got) < 1e-8


@pytest.mark.parametrize("blocks", [False, True])
@pytest.mark.parametrize("model", ["conv4-miniimagenet", "resnet12"])
def test_products_run_under_bf16_autocast(sweeps, model, blocks):
    """Batch-norm models' products under bf16 autocast give reverse mode's bf16 meta-gradient to bf16's precision:
    0.55% and 0.24% apart, whole-model and block by block alike, where float32 reverse is 33% and 24% from it. Whole
    model, the norm once returned bf16 with a float32 tangent, which the next convolution refused. Block by block,
    each block runs under the autocast the model ran it in (block_products `Split.autocast`): it was once read after
    the model's forward had left its autocast, so the blocks ran in float32, 26% from reverse's bf16."""
    grads = {}
    for mode in ("reverse", "mixed"):
        torch.manual_seed(0)
        inner = InnerLoopSpec(steps=2, lr=0.1, differentiation=mode, autocast="bf16", mixed_blocks=blocks)
        alg = build_algorithm(AlgorithmSpec(name="maml", inner=inner), build_model(MODELS[model], 5))
        meta = alg.init(dict(alg.f.model.named_parameters()))
        got = meta_gradient(alg, meta, _images().to("cpu", torch.float32)).grads
        grads[mode] = torch.cat([g.flatten() for g in got.values()])
    assert sweeps["products"] == 2 * 2 and sweeps["block_products"] == (2 * 2 if blocks else 0)  # 2 tasks, 2 steps
    assert float((grads["mixed"] - grads["reverse"]).norm() / grads["reverse"].norm()) < 0.02


def test_whole_model_products_run_blocks_plainly_under_activation_checkpointing(float64, sweeps):
    """torch.func refuses checkpointing's saved-tensor hooks: under `checkpointed_blocks()` (the sharded runtime's
    activation checkpointing for second order) whole-model products run the blocks as they are (the query pass
    still recomputes them) and give reverse mode's meta-gradient."""
    from metascale.models.checkpointing import checkpointed_blocks

    reverse, mixed, meta = _setup("maml", MODELS["vit"], 5, steps=2, mixed_blocks=False)
    batch = _images()
    expected = meta_gradient(reverse, meta, batch).grads
    with checkpointed_blocks():
        got = meta_gradient(mixed, meta, batch).grads
    assert sweeps["products"] == 2 * len(batch) and sweeps["block_products"] == 0
    assert _relative(expected, got) < 1e-10


def _summed_objective(alg, params, batch) -> float:
    with torch.no_grad():
        return sum(float(alg.task_objective(params, t).objective) for t in batch.tasks())


@pytest.mark.parametrize("name", ["maml", "metasgd", "learned_hparams", "learned_loss"])
def test_mixed_matches_central_finite_differences(float64, sweeps, name):
    """Every coordinate of a small MLP's meta-parameters. Step 1e-6: central differences' truncation error
    (~eps^2 f''') is then negligible and rounding (~1e-16 f / eps) leaves ~1e-9 relative (measured 0.5-1.2e-9);
    larger steps are worse here (1e-4: 3e-8; 1e-5: up to 1e-7, where a perturbation crosses a ReLU kink)."""
    _, alg, meta = _setup(name, MLPSpec(hidden=[6]), 1, steps=3, lr=0.05)
    batch = _sinusoid()
    grads = meta_gradient(alg, meta, batch).grads
    assert sweeps["n"] == len(batch) and sweeps["block_products"] == 0  # the MLP has no blocks: whole-model products
    eps, fd, an = 1e-6, [], []
    for name_, value in meta.items():
        for i in range(value.numel()):
            plus = {k: v.detach().clone() for k, v in meta.items()}
            minus = {k: v.detach().clone() for k, v in meta.items()}
            plus[name_].view(-1)[i] += eps
            minus[name_].view(-1)[i] -= eps
            fd.append((_summed_objective(alg, plus, batch) - _summed_objective(alg, minus, batch)) / (2 * eps))
            an.append(float(grads[name_].view(-1)[i]))
    fd_t, an_t = torch.tensor(fd), torch.tensor(an)
    assert fd_t.norm() > 1e-2
    assert float((fd_t - an_t).norm() / fd_t.norm()) < 1e-8


@pytest.mark.parametrize("inner", [{"query_chunk": 2}, {"checkpoint": "all"}])
def test_mixed_composes_with_the_query_pass_options(float64, sweeps, inner):
    """The sweep starts from whatever gradient the query pass hands back: chunked or block-checkpointed."""
    reverse, _, meta = _setup("metasgd", MODELS["resnet12"], 5, steps=3)
    _, mixed, _ = _setup("metasgd", MODELS["resnet12"], 5, steps=3, **inner)
    batch = _images()
    expected = meta_gradient(reverse, meta, batch).grads
    got = meta_gradient(mixed, meta, batch).grads
    assert sweeps["n"] == len(batch)
    assert _relative(expected, got) < 1e-10


def test_mixed_keeps_no_graph_when_there_is_nothing_to_differentiate(float64, sweeps):
    """Evaluation (no grad) and zero inner steps adapt by the plain loop, with the same adapted loss."""
    reverse, mixed, meta = _setup("maml", MODELS["conv4-omniglot"], 5, steps=2)
    task = next(iter(_images(1).tasks()))
    with torch.no_grad():
        a, b = reverse.task_objective(meta, task).objective, mixed.task_objective(meta, task).objective
    assert float(a) == float(b)
    mixed.task_objective(meta, task, steps=0)
    assert sweeps["n"] == 0


@pytest.mark.parametrize("chunk", [None, 2])
@pytest.mark.parametrize("strategy", ["per_task", "vmap"])
@pytest.mark.parametrize("model", list(MODELS))
def test_block_products_equal_the_whole_model_product(float64, model, strategy, chunk):
    """grad_and_product, block by block, gives the whole model's dL/dphi, dL/dh, H u and H_hphi u (one jvp of grad)
    for a support loss that reads a hyperparameter after the model (a temperature) and every weight outside it (a
    decay): the stem (the ViT's patches), the blocks and the tail all contribute. Also with every block but the last
    in chunks of 2 of the 5 examples, their batch statistics explicit (norm_chunks.py; the ViT has none)."""
    import torch.nn.functional as F

    from metascale.algorithms.block_products import grad_and_product, split_at_blocks
    from metascale.models.norm import batched_tasks

    spec = ViTSpec(dim=8, depth=2, heads=2) if model == "vit" else MODELS[model]  # two blocks at least
    _, alg, meta = _setup("maml", spec, 5, steps=1)
    phi, h = {k: v.detach() for k, v in meta.items()}, {"temperature": torch.tensor(1.3)}
    batch = _images()

    def loss(p, hh, x, y):
        return F.cross_entropy(alg.f(p, x) * hh["temperature"], y) + 0.01 * sum((v**2).sum() for v in p.values())

    def both(x, y, u):
        split = split_at_blocks(loss, phi, h, x, y)
        assert split is not None and len(split.blocks) >= 2 and split.stem_is_input == (model != "vit")
        (g, gh), (hu, hhu) = torch.func.jvp(
            torch.func.grad(lambda p, hh: loss(p, hh, x, y), argnums=(0, 1)),
            (phi, h),
            (u, {k: torch.zeros_like(v) for k, v in h.items()}),
        )
        chunks = None if chunk is None else [chunk] * (len(split.blocks) - 1)  # every block but the last
        return (g, gh, hu, hhu), grad_and_product(split, loss, phi, h, x, y, u, chunks=chunks)

    us = {k: torch.randn(len(batch), *v.shape) for k, v in phi.items()}
    if strategy == "vmap":
        with batched_tasks():
            pairs = [torch.func.vmap(both)(batch.support_x, batch.support_y, us)]
    else:
        tasks = list(batch.tasks())
        pairs = [both(t.support_x, t.support_y, {k: u[i] for k, u in us.items()}) for i, t in enumerate(tasks)]
    for whole, blocks in pairs:
        for a, b in zip(whole, blocks):
            assert set(a) == set(b) and _relative(a, b) < 1e-10
        assert float(sum((t**2).sum() for t in whole[3].values())) > 0  # H_hphi u is not trivially zero


def test_chunk_sizes_grow_where_the_maps_shrink():
    """ResNet-12 at 84x84 (16-32-64-128): a block's larger boundary, input or output, holds per example 3x84x84 +
    16x84x84 = 134064 numbers in the first stage (its parts hand on the stage's input beside their maps), 16x42x42 +
    32x42x42 = 84672 in the second, 32x21x21 + 64x21x21 = 42336 in the third and 64x10x10 + 128x10x10 = 19200 in the
    fourth. In chunks of 3 where they are largest, the stages take 3, 3*134064//84672 = 4, 9 and 20 examples at a
    time; a size that reaches the 25 examples runs whole. The last block is not chunked."""
    import torch.nn.functional as F

    from metascale.algorithms.block_products import chunk_sizes, split_at_blocks

    spec = ResNet12Spec(in_channels=3, channels=[16, 32, 64, 128], image_size=84)
    _, alg, meta = _setup("maml", spec, 5, steps=1)
    phi = {k: v.detach() for k, v in meta.items()}
    x, y = torch.randn(25, 3, 84, 84, dtype=torch.float64), torch.arange(25) % 5

    def loss(p, hh, xx, yy):
        return F.cross_entropy(alg.f(p, xx), yy)

    split = split_at_blocks(loss, phi, {}, x, y)
    assert split is not None and len(split.blocks) == 12
    assert chunk_sizes(split, loss, phi, {}, x, y, 3) == [3] * 3 + [4] * 3 + [9] * 3 + [20] * 2
    assert chunk_sizes(split, loss, phi, {}, x, y, 12) == [12] * 3 + [19] * 3 + [None] * 5
