"""A plain Vision Transformer (Dosovitskiy et al. 2021) sized by the spec: the reference large backbone.

Attention is written out (softmax(q k^T / sqrt(d)) v) so that it has double-backward and vmap rules everywhere;
layer norms are `TaskLayerNorm`, whose second-order gradients stay exact under vmap (models/norm.py says why).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metascale.config import ViTSpec
from metascale.models.checkpointing import run_blocks
from metascale.models.norm import TaskLayerNorm


class Block(nn.Module):
    """Pre-norm attention then MLP, each a residual half (`halves`): the units `run_blocks` checkpoints and mixed mode
    differentiates one at a time, so that what is held at once is half a block's activations. The halves hold the
    block's own layers but are not registered under it, so the parameters keep one name each (blocks.i.qkv.weight)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1, self.qkv, self.proj = TaskLayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        hidden = int(dim * mlp_ratio)
        self.norm2, self.fc1, self.fc2 = TaskLayerNorm(dim), nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        object.__setattr__(
            self, "halves", (Attention(self.norm1, self.qkv, self.proj, heads), MLP(self.norm2, self.fc1, self.fc2))
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.halves[1](self.halves[0](x))


class Attention(nn.Module):
    def __init__(self, norm: nn.Module, qkv: nn.Module, proj: nn.Module, heads: int):
        super().__init__()
        self.norm, self.qkv, self.proj, self.heads = norm, qkv, proj, heads

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5, dim=-1)
        return x + self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))


class MLP(nn.Module):
    def __init__(self, norm: nn.Module, fc1: nn.Module, fc2: nn.Module):
        super().__init__()
        self.norm, self.fc1, self.fc2 = norm, fc1, fc2

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class ViT(nn.Module):
    def __init__(self, spec: ViTSpec, out_features: int):
        super().__init__()
        n_patches = (spec.image_size // spec.patch_size) ** 2
        self.patch = nn.Conv2d(spec.in_channels, spec.dim, spec.patch_size, stride=spec.patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, spec.dim))
        self.pos = nn.Parameter(torch.randn(1, n_patches + 1, spec.dim) * 0.02)
        self.blocks = nn.ModuleList(Block(spec.dim, spec.heads, spec.mlp_ratio) for _ in range(spec.depth))
        self.norm = TaskLayerNorm(spec.dim)
        self.feature_dim = spec.dim
        self.head = nn.Linear(spec.dim, out_features)
        self.checkpoint_blocks = False  # activation checkpointing per block (set by the sharded runtime)

    def forward(self, x: Tensor, embed: bool = False) -> Tensor:
        h = self.patch(x).flatten(2).transpose(1, 2)
        h = torch.cat([self.cls.expand(h.shape[0], -1, -1), h], dim=1) + self.pos
        h = run_blocks([half for block in self.blocks for half in block.halves], h, self.checkpoint_blocks)
        h = self.norm(h)[:, 0]
        return h if embed else self.head(h)
