"""`model.init_from`: a fresh run's starting weights from a file on disk (no hub access: the file is there or it is a
one-line error).

The file is a safetensors file (by its `.safetensors` suffix) or a torch state dict (`torch.save(m.state_dict())`,
read with `weights_only=True`, so no code in it runs). Its keys are the model's parameter names relative to
`model.init_into`: '' the whole model (e.g. a `metascale export`), 'body' a custom model's backbone (the backbone's
own `state_dict()`). Every parameter there must be in the file with its shape, and every entry of the file must be one
of them, except:
- the classifier `head.*` (init_into ''): absent, or of another shape (a new N-way head on a backbone trained on
  other classes), it keeps its random initialisation;
- batch-norm running statistics (`running_mean`, `running_var`, `num_batches_tracked`) and entries naming one of the
  model's buffers: metascale normalises per task, and buffers stay as the model builds them on every worker
  (algorithms/base.py), so they are skipped.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from metascale.config import ModelInit
from metascale.errors import ModelError

BN_STATS = ("running_mean", "running_var", "num_batches_tracked")
SHOWN = 4  # keys listed per kind of problem; the rest are counted


def read_state(path: str) -> dict[str, Tensor]:
    if not Path(path).is_file():
        raise ModelError(f"model.init_from {path}: no such file")
    safetensors = path.endswith(".safetensors")
    try:
        if safetensors:
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        kind = "safetensors file" if safetensors else "torch state dict (torch.load, weights_only=True)"
        first = (str(e).strip().splitlines() or ["no message"])[0]
        raise ModelError(f"model.init_from {path}: not a readable {kind} ({type(e).__name__}: {first})") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        keys = list(state)[:SHOWN] if isinstance(state, dict) else []
        raise ModelError(
            f"model.init_from {path}: not a flat state dict of tensors ({type(state).__name__}"
            + (f" with keys {', '.join(map(str, keys))}" if keys else "")
            + "): save the model's state_dict() itself"
        )
    return state


def load_init(model: nn.Module, params: dict[str, Tensor], spec: ModelInit) -> int:
    """Copies the file's tensors into `params` (the model's parameters by name, updated in place); returns how many
    parameters it set."""
    assert spec.init_from is not None
    path, into = spec.init_from, spec.init_into
    prefix = f"{into}." if into else ""
    ours = {k.removeprefix(prefix): v for k, v in params.items() if k.startswith(prefix)}
    if not ours:
        tops = sorted({k.split(".")[0] for k in params})
        raise ModelError(
            f"model.init_into '{into}' names no part of the model with parameters (its parts: {', '.join(tops)})"
        )
    state = read_state(path)
    buffers = {k.removeprefix(prefix) for k, _ in model.named_buffers() if k.startswith(prefix)}
    fresh = (lambda k: k.startswith("head.")) if not into else (lambda k: False)
    unexpected = [k for k in state if k not in ours and k not in buffers and k.rsplit(".", 1)[-1] not in BN_STATS]
    missing = [k for k in ours if k not in state and not fresh(k)]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in ours.items()
        if k in state and state[k].shape != v.shape and not fresh(k)
    ]
    problems = [
        f"{len(keys)} {what} ({_shown(keys)})"
        for what, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape mismatches, file vs model", mismatched),
        )
        if keys
    ]
    if problems:
        where = f" (keys relative to model.init_into '{into}')" if into else ""
        raise ModelError(f"model.init_from {path} does not fit the model{where}: {'; '.join(problems)}")
    loaded = 0
    with torch.no_grad():
        for k, v in ours.items():
            if k in state and state[k].shape == v.shape:
                v.copy_(state[k].to(v.dtype))
                loaded += 1
    return loaded


def _shown(keys: list[str]) -> str:
    more = len(keys) - SHOWN
    return ", ".join(keys[:SHOWN]) + (f", ... {more} more" if more > 0 else "")
