"""A DARTS search network (Liu, Simonyan & Yang, ICLR 2019): cells whose edges are softmax(alpha)-weighted mixtures
of candidate operations, with the architecture weights `alpha` an ordinary parameter of the model.

Layout (kept small for few-shot images on CPU): a 3x3 stride-2 stem (conv, per-task batch norm, ReLU), then
`cells` cells, each followed by a fixed 2x2 max-pool, then the spatial mean and the `head`. A cell is a DAG on one
input (the previous cell's output) and `nodes` intermediate nodes; node i sums one mixed edge from the input and
from every earlier node; the cell's output is the mean of its intermediate nodes. Every cell shares one `alpha`
(edges x ops), as DARTS' normal cells share alpha_normal; down-sampling is the fixed pool, not a searched
reduction cell. As in DARTS, convolutions are ReLU -> conv -> batch norm (here per task: models/norm.py).

`derive` reads the discrete architecture off alpha: the strongest op of every edge other than 'none' (DARTS'
genotype before its top-2-inputs-per-node pruning, which the listed weights allow). With `genotype` set (one op per
edge) the network is that fixed discrete cell instead, with no alpha: DARTS' evaluation protocol retrains the derived
cell from scratch, and random search samples such cells (`random_genotype`) from the same space.
"""

from __future__ import annotations

import random
from typing import Any, Callable

import torch
from torch import Tensor, nn

from metascale.config import DartsSpec
from metascale.models.norm import TaskBatchNorm

ALPHA = "alpha"  # the architecture weights' parameter name (the `darts` algorithm keeps it out of the inner loop)


class Zero(nn.Module):
    """DARTS' 'none': the edge contributes nothing (its weight then only scales the others down)."""

    def forward(self, x: Tensor) -> Tensor:
        return x * 0.0


def _conv(c: int, k: int, dilation: int = 1) -> nn.Module:
    return nn.Sequential(
        nn.ReLU(), nn.Conv2d(c, c, k, padding=dilation * (k // 2), dilation=dilation, bias=False), TaskBatchNorm(c)
    )


OPS: dict[str, Callable[[int], nn.Module]] = {
    "none": lambda c: Zero(),
    "skip": lambda c: nn.Identity(),
    "conv3": lambda c: _conv(c, 3),
    "conv5": lambda c: _conv(c, 5),
    "dil_conv3": lambda c: _conv(c, 3, dilation=2),
    "max_pool": lambda c: nn.MaxPool2d(3, stride=1, padding=1),
    "avg_pool": lambda c: nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False),
}


def edge_names(nodes: int) -> list[tuple[str, str]]:
    """(from, to) of every edge of a cell, in alpha's row order."""
    states = ["input"] + [f"node{i}" for i in range(nodes)]
    return [(states[j], f"node{i}") for i in range(nodes) for j in range(i + 1)]


CONVS = ("conv3", "conv5", "dil_conv3")  # the ops with weights: random search restricted to them is the baseline that
# separates a search from the rule "a convolution on every edge" (docs/survey-map.md)


def random_genotype(ops: list[str], nodes: int, seed: int, convs_only: bool = False) -> list[str]:
    """A discrete cell drawn uniformly from the search space: per edge one op other than 'none' (as `derive`
    chooses), only from `CONVS` with `convs_only`; a pure function of `seed`."""
    rng = random.Random(seed)
    pool = [o for o in ops if o != "none" and (not convs_only or o in CONVS)]
    if not pool:
        raise ValueError(f"ops {ops} leave nothing to draw: " + ("no convolution" if convs_only else "only 'none'"))
    return [rng.choice(pool) for _ in edge_names(nodes)]


class MixedEdge(nn.Module):
    def __init__(self, ops: list[str], channels: int):
        super().__init__()
        self.ops = nn.ModuleList(OPS[name](channels) for name in ops)

    def forward(self, x: Tensor, weights: Tensor | None) -> Tensor:
        if weights is None:  # a fixed discrete cell: the edge's one op
            return self.ops[0](x)
        return sum(w * op(x) for w, op in zip(weights.unbind(-1), self.ops))


class Cell(nn.Module):
    def __init__(self, edge_ops: list[list[str]], channels: int, nodes: int):
        super().__init__()
        self.nodes = nodes
        self.edges = nn.ModuleList(MixedEdge(ops, channels) for ops in edge_ops)

    def forward(self, x: Tensor, weights: Tensor | None) -> Tensor:
        states, e = [x], 0
        for i in range(self.nodes):
            node = 0
            for j in range(i + 1):
                node = node + self.edges[e](states[j], None if weights is None else weights[e])
                e += 1
            states.append(node)
        return torch.stack(states[1:]).mean(0)


class DartsNet(nn.Module):
    def __init__(self, spec: DartsSpec, out_features: int):
        super().__init__()
        c = spec.channels
        self.ops = list(spec.ops)
        self.nodes = spec.nodes
        self.stem = nn.Sequential(nn.Conv2d(spec.in_channels, c, 3, stride=2, padding=1), TaskBatchNorm(c), nn.ReLU())
        edges = len(edge_names(spec.nodes))
        edge_ops = [[op] for op in spec.genotype] if spec.genotype else [self.ops] * edges
        self.cells = nn.ModuleList(Cell(edge_ops, c, spec.nodes) for _ in range(spec.cells))
        self.pool = nn.MaxPool2d(2)
        # Zero: a uniform mixture at the start, as in DARTS (1e-3 * randn there; exactly uniform here, no seed needed).
        # A fixed genotype has no alpha: nothing to mix.
        self.alpha = None if spec.genotype else nn.Parameter(torch.zeros(edges, len(self.ops)))
        self.feature_dim = c
        self.head = nn.Linear(c, out_features)

    def forward(self, x: Tensor, embed: bool = False) -> Tensor:
        weights = None if self.alpha is None else torch.softmax(self.alpha, dim=-1)
        h = self.stem(x)
        for cell in self.cells:
            h = self.pool(cell(h, weights))
        h = h.mean(dim=(2, 3))
        return h if embed else self.head(h)


def derive(alpha: Tensor, ops: list[str], nodes: int) -> dict[str, Any]:
    """The discrete architecture: per edge, the op with the largest weight among all but 'none', with every op's
    softmax weight (plain JSON)."""
    weights = torch.softmax(alpha.detach().double().cpu(), dim=-1)
    candidates = [i for i, name in enumerate(ops) if name != "none"]
    edges = []
    for (src, dst), w in zip(edge_names(nodes), weights):
        best = max(candidates, key=lambda i: float(w[i]))
        edges.append(
            {
                "from": src,
                "to": dst,
                "op": ops[best],
                "weight": round(float(w[best]), 6),
                "weights": {name: round(float(v), 6) for name, v in zip(ops, w)},
            }
        )
    return {"ops": list(ops), "nodes": nodes, "cell": "shared by every cell", "edges": edges}


def fixed(genotype: list[str], ops: list[str], nodes: int) -> dict[str, Any]:
    """A fixed discrete cell (`genotype`) in `derive`'s layout: one op per edge, all its weight."""
    edges = [{"from": src, "to": dst, "op": op, "weight": 1.0} for (src, dst), op in zip(edge_names(nodes), genotype)]
    return {"ops": list(ops), "nodes": nodes, "cell": "shared by every cell", "edges": edges}
