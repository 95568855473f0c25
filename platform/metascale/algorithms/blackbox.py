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

from metascale.algorithms.base import MetaAlgorithm, Params, TaskOutput, one_hot, register, task_loss, task_metrics
from metascale.data.tasks import Task

PREFIX = "blackbox."


def _linear(fan_in: int, fan_out: int, **kw) -> tuple[Tensor, Tensor]:
    return torch.randn(fan_in, fan_out, **kw) / math.sqrt(fan_in), torch.zeros(fan_out, **kw)


def init_transformer(features: int, ways: int, dim: int, depth: int, mlp_ratio: float, **kw) -> Params:
    """Random weights (fan-in scaled), zero biases, unit layer-norm gains; keys without the prefix. The first block's
    key projection starts equal to its query projection, so its scores start as a similarity kernel over the image
    embeddings (a query attends most to the support images resembling it); the label vectors have the embedding's
    scale, so that the values carry them (measured effect: docs/survey-map.md, black-box learner)."""
    p: Params = {}
    p["embed_w"], p["embed_b"] = _linear(features, dim, **kw)
    p["label_w"] = torch.randn(ways, dim, **kw)  # unit scale, as the embedding's: the label must not be drowned
    p["unknown"] = torch.randn(dim, **kw)
    hidden = max(1, round(dim * mlp_ratio))
    for i in range(depth):
        b = f"block{i}."
        for ln in ("ln1", "ln2"):
            p[b + ln + "_w"], p[b + ln + "_b"] = torch.ones(dim, **kw), torch.zeros(dim, **kw)
        p[b + "qkv_w"], p[b + "qkv_b"] = _linear(dim, 3 * dim, **kw)
        if i == 0:  # keys start as queries: q.k starts as a similarity kernel over the embeddings
            p[b + "qkv_w"][:, dim : 2 * dim] = p[b + "qkv_w"][:, :dim]
        p[b + "proj_w"], p[b + "proj_b"] = _linear(dim, dim, **kw)
        p[b + "fc1_w"], p[b + "fc1_b"] = _linear(dim, hidden, **kw)
        p[b + "fc2_w"], p[b + "fc2_b"] = _linear(hidden, dim, **kw)
    p["ln_w"], p["ln_b"] = torch.ones(dim, **kw), torch.zeros(dim, **kw)
    p["out_w"], p["out_b"] = _linear(dim, ways, **kw)
    return p


def _heads(x: Tensor, heads: int) -> Tensor:
    """[T, d] -> [heads, T, d / heads]."""
    return x.reshape(x.shape[0], heads, -1).transpose(0, 1)


def _attention(p: Params, b: str, s: Tensor, q: Tensor, heads: int, match: tuple[Tensor, Tensor] | None = None):
    """Multi-head attention: support over support; each query over the support and itself. `match` (support,
    query) replaces the tokens as what queries and keys are computed from (values still come from the tokens)."""
    dim = s.shape[-1]
    w, bias = p[b + "qkv_w"], p[b + "qkv_b"]
    ms, mq = match if match is not None else (s, q)

    def project(x: Tensor, part: int) -> Tensor:
        return _heads(x @ w[:, part * dim : (part + 1) * dim] + bias[part * dim : (part + 1) * dim], heads)

    sq, sk, sv = project(ms, 0), project(ms, 1), project(s, 2)
    qq, qk, qv = project(mq, 0), project(mq, 1), project(q, 2)
    scale = 1.0 / math.sqrt(dim // heads)
    s_out = torch.softmax(sq @ sk.transpose(-1, -2) * scale, -1) @ sv  # [h, S, dh]
    to_support = qq @ sk.transpose(-1, -2) * scale  # [h, Q, S]
    to_self = (qq * qk).sum(-1, keepdim=True) * scale  # [h, Q, 1]
    att = torch.softmax(torch.cat([to_support, to_self], -1), -1)
    q_out = att[..., :-1] @ sv + att[..., -1:] * qv  # [h, Q, dh]

    def merge(o: Tensor) -> Tensor:
        return o.transpose(0, 1).reshape(o.shape[1], dim) @ p[b + "proj_w"] + p[b + "proj_b"]

    return merge(s_out), merge(q_out)


def transformer_logits(p: Params, support: Tensor, support_y: Tensor, query: Tensor, heads: int) -> Tensor:
    """Query logits [Q, ways] from support features [S, D] with labels [S] and query features [Q, D]."""
    ways, dim = p["label_w"].shape
    es, eq = support @ p["embed_w"] + p["embed_b"], query @ p["embed_w"] + p["embed_b"]
    s = es + one_hot(support_y, ways, support.dtype) @ p["label_w"]
    q = eq + p["unknown"]
    depth = sum(1 for k in p if k.endswith(".qkv_w"))
    for i in range(depth):
        b = f"block{i}."

        def norm(x: Tensor, which: str) -> Tensor:
            return F.layer_norm(x, (dim,), p[b + which + "_w"], p[b + which + "_b"])

        # The first block matches on the images alone (labels are what is to be read, not matched on).
        match = (norm(es, "ln1"), norm(eq, "ln1")) if i == 0 else None
        ds, dq = _attention(p, b, norm(s, "ln1"), norm(q, "ln1"), heads, match)
        s, q = s + ds, q + dq
        s, q = s + _mlp(p, b, norm(s, "ln2")), q + _mlp(p, b, norm(q, "ln2"))
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
