"""ResNet-12 hands its stages to `run_blocks` in three parts, one conv each (models/resnet12.py): mixed mode's block
products then hold a third of a stage's activations at a time; the parameters keep the stage's names."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_leaves, tree_map

from metascale.algorithms.block_products import split_at_blocks
from metascale.algorithms.norm_chunks import ChunkedBlock
from metascale.config import ResNet12Spec
from metascale.models.resnet12 import ResNet12

# cut before each norm: a part's first norm reads the part's input (models/resnet12.py)
PARTS = (["conv1.weight"], ["bn1.weight", "bn1.bias", "conv2.weight"],
         ["bn2.weight", "bn2.bias", "conv3.weight", "bn3.weight", "bn3.bias", "shortcut.weight", "bn_sc.weight",
          "bn_sc.bias"])  # fmt: skip


def test_resnet12_blocks_are_three_parts_a_stage_under_the_stages_names():
    torch.manual_seed(0)
    model = ResNet12(ResNet12Spec(in_channels=1, channels=[4, 6], image_size=8), 3)
    phi = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, h, x, y):
        return F.cross_entropy(torch.func.functional_call(model, p, (x,)), y)

    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    split = split_at_blocks(loss, phi, {}, x, y)
    assert split is not None and split.stem_is_input and split.outside == ["head.weight", "head.bias"]
    expected = [[f"stages.{i}.{name}" for name in part] for i in range(2) for part in PARTS]
    assert [list(block.keys.values()) for block in split.blocks] == expected


def test_a_norm_that_reads_its_parts_input_takes_its_share_in_one_map(float64):
    """bn1 and bn2 normalise their part's input (the cut is before them): in support chunks the pullback finds them
    and pushes their statistics' adjoint through one per-channel map of each input chunk (models/norm.py
    `share_pullback`) instead of a vjp per chunk. Gradient and product (forward mode through the pullback) equal the
    whole set's, native batch norm's."""
    torch.manual_seed(0)
    stage = ResNet12(ResNet12Spec(in_channels=2, channels=[4], image_size=6), 3).stages[0]
    x = torch.randn(5, 2, 6, 6)
    inputs = {1: (x, stage.parts[0](x)[1]), 2: stage.parts[1](stage.parts[0](x))}
    for index, reads in ((1, [1]), (2, [1, None, None])):
        part = stage.parts[index]
        theta = {k: v.detach() for k, v in part.named_parameters()}

        def f(th, h, part=part):
            return torch.func.functional_call(part, th, (h,))

        h = tuple(t.detach() for t in inputs[index])
        c, cdot = (tree_map(torch.randn_like, f(theta, h)) for _ in range(2))
        dots = (tree_map(torch.randn_like, theta), tree_map(torch.randn_like, h))

        def whole(th, hh, cc):
            return torch.func.vjp(f, th, hh)[1](cc)

        def chunked(th, hh, cc):
            op = ChunkedBlock(f, len(x), 2)
            out, stats = op.forward(th, hh)
            assert op.reads == reads
            return op.pullback(th, hh, stats, cc)

        expected = torch.func.jvp(whole, (theta, h, c), (*dots, cdot))
        got = torch.func.jvp(chunked, (theta, h, c), (*dots, cdot))
        for a, b in zip(tree_leaves(got), tree_leaves(expected), strict=True):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
