"""The backbones' activation-checkpointing hooks (per ViT block / ResNet-12 stage) leave gradients unchanged,
including second order (a gradient of an inner gradient), in one process. Under ZeRO-3: test_sharding_ranks.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from metascale.config import ResNet12Spec, ViTSpec
from metascale.models.resnet12 import ResNet12
from metascale.models.vit import ViT
from metascale.sharding.engine import enable_activation_checkpointing


def gradients(model, x, y, second_order: bool) -> list[torch.Tensor]:
    params = list(model.parameters())
    loss = F.cross_entropy(model(x), y)
    if second_order:  # d/dtheta of ||dL/dtheta||^2, which goes through every block's backward
        inner = torch.autograd.grad(loss, params, create_graph=True)
        loss = sum((g**2).sum() for g in inner)
    return list(torch.autograd.grad(loss, params))


@pytest.mark.parametrize(
    "make,size",
    [
        (lambda: ViT(ViTSpec(dim=16, depth=2, heads=2), 3), 28),
        (lambda: ResNet12(ResNet12Spec(channels=[8, 8, 8, 8], image_size=16, in_channels=1), 3), 16),
    ],
)
@pytest.mark.parametrize("second_order", [False, True])
def test_checkpointing_gives_the_same_gradients(make, size, second_order, monkeypatch):
    import metascale.models.checkpointing as blocks

    calls = []
    real = blocks.checkpoint
    monkeypatch.setattr(blocks, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    model = make()
    x, y = torch.randn(4, 1, size, size), torch.tensor([0, 1, 2, 0])
    plain = gradients(model, x, y, second_order)
    assert not calls
    enable_activation_checkpointing(model)
    checkpointed = gradients(model, x, y, second_order)
    assert len(calls) >= 2  # every block (ViT) or stage (ResNet-12) went through the checkpoint
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("flag,context", [(False, None), (False, True), (False, False), (True, None)])
def test_recomputes_says_what_a_pass_does(flag, context, monkeypatch):
    """`recomputes` (what Rank.held reports) agrees with whether a pass went through the checkpoint: by the model's
    own flag (first order) or inside checkpointed_blocks() (second order's functional_call)."""
    import contextlib

    import metascale.models.checkpointing as blocks

    calls = []
    real = blocks.checkpoint
    monkeypatch.setattr(blocks, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = ViT(ViTSpec(dim=16, depth=1, heads=2), 3)
    model.checkpoint_blocks = flag
    with contextlib.nullcontext() if context is None else blocks.checkpointed_blocks(context):
        said = blocks.recomputes(model)
        params = dict(model.named_parameters())
        torch.func.functional_call(model, params, (torch.randn(2, 1, 28, 28),)).sum().backward()
    assert said == bool(calls) == (flag or bool(context))
    assert not blocks.recomputes(torch.nn.Linear(2, 2))  # no blocks to recompute
