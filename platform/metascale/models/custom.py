"""A user's own backbone by import path: `model: {name: custom, target: "package.module:ClassOrFactory", kwargs}`.

The target, called with `kwargs`, returns a module that maps a batch of inputs to features (batch, D); metascale puts
the N-way `head` on top, so ANIL and ProtoNets find the two apart as in every other model (models/__init__.py).
Batch norm becomes per-task batch norm (TaskBatchNorm, as in Conv-4 and ResNet-12): the algorithms call the model
through torch.func (functional_call, vmap), where running statistics would be in-place writes to shared buffers, and
each task is normalised by its own batch, as in MAML. Layer norm becomes TaskLayerNorm, whose second-order gradients
stay exact under vmap (as in the ViT). The module must be importable in every worker process too (installed in the
image, or on PYTHONPATH).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from torch import Tensor, nn

from metascale.config import CustomModelSpec
from metascale.errors import ModelError
from metascale.models.norm import TaskBatchNorm, TaskLayerNorm


def import_target(target: str) -> Callable[..., Any]:
    """'package.module:Name.attr' -> the object, or a one-line ModelError saying which part failed."""
    module_name, _, attrs = target.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or whatever the module raises while it runs
        raise ModelError(
            f"model.target '{target}': cannot import {module_name} ({type(e).__name__}: {_line(e)})"
        ) from None
    for attr in attrs.split("."):
        if not hasattr(obj, attr):
            owner = getattr(obj, "__name__", module_name)
            raise ModelError(f"model.target '{target}': {owner} has no attribute '{attr}'")
        obj = getattr(obj, attr)
    if not callable(obj):
        raise ModelError(f"model.target '{target}' is a {type(obj).__name__}, not a class or factory")
    return obj


def per_task_norm(module: nn.Module) -> nn.Module:
    """Every batch-norm layer inside `module` replaced by a TaskBatchNorm with its affine weights (if it had any), and
    every plain `nn.LayerNorm` (exactly that class: subclasses may change the layout) by a TaskLayerNorm."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            norm = TaskBatchNorm(child.num_features, eps=child.eps)
            if child.affine:
                norm.weight.data.copy_(child.weight.data)
                norm.bias.data.copy_(child.bias.data)
            setattr(module, name, norm)
        elif type(child) is nn.LayerNorm:
            layer = TaskLayerNorm(child.normalized_shape, child.eps, child.elementwise_affine, child.bias is not None)
            layer.load_state_dict(child.state_dict())
            setattr(module, name, layer)
        else:
            per_task_norm(child)
    return module


class Custom(nn.Module):
    def __init__(self, spec: CustomModelSpec, out_features: int):
        super().__init__()
        factory = import_target(spec.target)
        try:
            body = factory(**spec.kwargs)
        except Exception as e:
            raise ModelError(
                f"model.target '{spec.target}' with kwargs {spec.kwargs} failed: {type(e).__name__}: {_line(e)}"
            ) from None
        if not isinstance(body, nn.Module):
            raise ModelError(f"model.target '{spec.target}' returned a {type(body).__name__}, not a torch.nn.Module")
        self.body = per_task_norm(body)
        dim = spec.feature_dim or getattr(body, "feature_dim", None) or getattr(body, "num_features", None)
        if not isinstance(dim, int) or dim <= 0:
            raise ModelError(
                f"model.target '{spec.target}': its module has no integer `feature_dim` or "
                "`num_features` (the size of the features it returns): set model.feature_dim"
            )
        self.feature_dim = dim
        self.head = nn.Linear(dim, out_features)

    def forward(self, x: Tensor, embed: bool = False) -> Tensor:
        h = self.body(x)
        return h if embed else self.head(h)


def _line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "no message"
