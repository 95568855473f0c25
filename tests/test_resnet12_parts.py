"""ResNet-12 hands its stages to `run_blocks` in three parts, one conv each (models/resnet12.py): mixed mode's block
products then hold a third of a stage's activations at a time; the parameters keep the stage's names."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from metascale.algorithms.block_products import split_at_blocks
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
