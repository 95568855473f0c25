"""A black-box (model-based) learner: a transformer reads the support set and predicts the query labels, with no
inner loop (the survey's "black-box adaptation"; in the spirit of SNAIL, Mishra et al. 2018, and conditional neural
processes, Garnelo et al. 2018). Learning a task is a forward pass.

Tokens: the model's embedding (`embed=True`) of each image, projected to `blackbox.dim`, plus a learned label
embedding (support: its one-hot label; query: a learned "unknown" vector). Support tokens attend to each other; each
query token attends to the support tokens and to itself only, so a query's prediction does not depend on the other
queries. There are no positions: the support set is a set, and the prediction is invariant to its order.
The transformer's weights are extra meta-parameters (keys `blackbox.*`), trained with the embedding by the outer
optimiser; the model's classifier head is unused (as in ProtoNets).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from metascale.algorithms.base import MetaAlgorithm, Params, TaskOutput, register, task_loss, task_metrics
from metascale.data.tasks import Task

PREFIX = "blackbox."


def _linear(fan_in: int, fan_out: int, **kw) -> tuple[Tensor, Tensor]:
    return torch.randn(fan_in, fan_out, **kw) / math.sqrt(fan_in), torch.zeros(fan_out, **kw)


def init_transformer(features: int, ways: int, dim: int, depth: int, mlp_ratio: float, **kw) -> Params:
    """Random weights (fan-in scaled), zero biases, unit layer-norm gains; keys without the prefix."""
    p: Params = {}
    p["embed_w"], p["embed_b"] = _linear(features, dim, **kw)
    p["label_w"] = torch.randn(ways, dim, **kw) / math.sqrt(dim)
    p["unknown"] = torch.randn(dim, **kw) / math.sqrt(dim)
    hidden = max(1, round(dim * mlp_ratio))
    for i in range(depth):
        b = f"block{i}."
        for ln in ("ln1", "ln2"):
            p[b + ln + "_w"], p[b + ln + "_b"] = torch.ones(dim, **kw), torch.zeros(dim, **kw)
        p[b + "qkv_w"], p[b + "qkv_b"] = _linear(dim, 3 * dim, **kw)
        p[b + "proj_w"], p[b + "proj_b"] = _linear(dim, dim, **kw)
        p[b + "fc1_w"], p[b + "fc1_b"] = _linear(dim, hidden, **kw)
        p[b + "fc2_w"], p[b + "fc2_b"] = _linear(hidden, dim, **kw)
    p["ln_w"], p["ln_b"] = torch.ones(dim, **kw), torch.zeros(dim, **kw)
    p["out_w"], p["out_b"] = _linear(dim, ways, **kw)
    return p


def _heads(x: Tensor, heads: int) -> Tensor:
    """[T, d] -> [heads, T, d / heads]."""
    return x.reshape(x.shape[0], heads, -1).transpose(0, 1)


def _attention(p: Params, b: str, s: Tensor, q: Tensor, heads: int) -> tuple[Tensor, Tensor]:
    """Multi-head attention: support over support; each query over the support and itself."""
    dim = s.shape[-1]
    sq, sk, sv = _heads(s @ p[b + "qkv_w"] + p[b + "qkv_b"], heads).split(dim // heads, -1)
    qq, qk, qv = _heads(q @ p[b + "qkv_w"] + p[b + "qkv_b"], heads).split(dim // heads, -1)
    scale = 1.0 / math.sqrt(dim // heads)
    s_out = torch.softmax(sq @ sk.transpose(-1, -2) * scale, -1) @ sv  # [h, S, dh]
    to_support = qq @ sk.transpose(-1, -2) * scale  # [h, Q, S]
    to_self = (qq * qk).sum(-1, keepdim=True) * scale  # [h, Q, 1]
    w = torch.softmax(torch.cat([to_support, to_self], -1), -1)
    q_out = w[..., :-1] @ sv + w[..., -1:] * qv  # [h, Q, dh]

    def merge(o: Tensor) -> Tensor:
        return o.transpose(0, 1).reshape(o.shape[1], dim) @ p[b + "proj_w"] + p[b + "proj_b"]

    return merge(s_out), merge(q_out)


def transformer_logits(p: Params, support: Tensor, support_y: Tensor, query: Tensor, heads: int) -> Tensor:
    """Query logits [Q, ways] from support features [S, D] with labels [S] and query features [Q, D]."""
    ways, dim = p["label_w"].shape
    s = support @ p["embed_w"] + p["embed_b"] + F.one_hot(support_y, ways).to(support.dtype) @ p["label_w"]
    q = query @ p["embed_w"] + p["embed_b"] + p["unknown"]
    depth = sum(1 for k in p if k.endswith(".qkv_w"))
    for i in range(depth):
        b = f"block{i}."
        ds, dq = _attention(
            p,
            b,
            F.layer_norm(s, (dim,), p[b + "ln1_w"], p[b + "ln1_b"]),
            F.layer_norm(q, (dim,), p[b + "ln1_w"], p[b + "ln1_b"]),
            heads,
        )
        s, q = s + ds, q + dq
        s = s + _mlp(p, b, F.layer_norm(s, (dim,), p[b + "ln2_w"], p[b + "ln2_b"]))
        q = q + _mlp(p, b, F.layer_norm(q, (dim,), p[b + "ln2_w"], p[b + "ln2_b"]))
    return F.layer_norm(q, (dim,), p["ln_w"], p["ln_b"]) @ p["out_w"] + p["out_b"]


def _mlp(p: Params, b: str, x: Tensor) -> Tensor:
    return F.gelu(x @ p[b + "fc1_w"] + p[b + "fc1_b"]) @ p[b + "fc2_w"] + p[b + "fc2_b"]


@register
class BlackBox(MetaAlgorithm):
    name = "blackbox"

    def init(self, model_params: Params) -> Params:
        ref = next(iter(model_params.values()))
        head, s = self.f.model.head, self.spec.blackbox
        net = init_transformer(
            head.in_features, head.out_features, s.dim, s.depth, s.mlp_ratio, dtype=ref.dtype, device=ref.device
        )
        return {**model_params, **{PREFIX + k: v for k, v in net.items()}}

    def model_params(self, meta_params: Params) -> Params:
        return {k: v for k, v in meta_params.items() if not k.startswith(PREFIX)}

    def task_objective(self, meta_params: Params, task: Task, steps: int | None = None) -> TaskOutput:
        net = {k.removeprefix(PREFIX): v for k, v in meta_params.items() if k.startswith(PREFIX)}
        weights = self.model_params(meta_params)
        support = self.f(weights, task.support_x, embed=True)
        query = self.f(weights, task.query_x, embed=True)
        logits = transformer_logits(net, support, task.support_y, query, self.spec.blackbox.heads)
        loss = task_loss(logits, task.query_y)
        return TaskOutput(loss, task_metrics(logits, task.query_y, loss))
