"""Per-block activation checkpointing, switched on by a model's flag or from outside it.

A model runs its blocks through `run_blocks`: each block then keeps only its input for the backward pass and
recomputes its activations there, so a pass holds one block's activations at a time instead of all of them.

Two switches, because the recomputation must see the same weights as the forward pass:
- a model's `checkpoint_blocks` flag, for modules that run with their own parameters (the sharded runtime's
  DeepSpeed engine, whose ZeRO-3 hooks gather them);
- `checkpointed_blocks()`, for models called through `torch.func.functional_call` (the algorithms): the backward
  pass runs after functional_call has put the module's own parameters back, so each block's substituted
  parameters are handed to the checkpoint as explicit inputs and substituted again when it recomputes.
MAML's `inner.checkpoint: all` uses the second for the query pass, which dominates a task's peak memory.

`blocks_replaced(run)` hands the blocks to `run` instead: mixed mode's block-by-block products
(algorithms/block_products.py) split a model's forward there, so this is the one place that knows a model's blocks;
its whole-model products run them under `plain_blocks()`.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

_ON = contextvars.ContextVar("metascale_checkpointed_blocks", default=False)
BlocksRun = Callable[[list[nn.Module], Tensor], Tensor]
_REPLACED: contextvars.ContextVar[BlocksRun | None] = contextvars.ContextVar("metascale_blocks_run", default=None)


@contextlib.contextmanager
def checkpointed_blocks(enabled: bool = True) -> Iterator[None]:
    """Turns checkpointing on inside (False leaves an enclosing `checkpointed_blocks()` in force)."""
    token = _ON.set(enabled or _ON.get())
    try:
        yield
    finally:
        _ON.reset(token)


@contextlib.contextmanager
def blocks_replaced(run: BlocksRun) -> Iterator[None]:
    """Inside, `run_blocks(blocks, h)` returns `run(list(blocks), h)` (which may also raise to end the pass)."""
    token = _REPLACED.set(run)
    try:
        yield
    finally:
        _REPLACED.reset(token)


@contextlib.contextmanager
def plain_blocks() -> Iterator[None]:
    """Inside, `run_blocks` runs every block as it is, recomputing nothing whatever asks for it: for code under
    torch.func transforms, which refuse checkpointing's saved-tensor hooks (mixed mode's whole-model products)."""
    with blocks_replaced(_in_order):
        yield


def _in_order(blocks: Iterable[nn.Module], h: Tensor) -> Tensor:
    for block in blocks:
        h = block(h)
    return h


def recomputes(model: nn.Module) -> bool:
    """Whether a pass through `model` here recomputes its blocks (by its own flag or an enclosing
    `checkpointed_blocks()`): the one rule `run_blocks` follows, for reports of what a runtime does."""
    return hasattr(model, "checkpoint_blocks") and _recomputing(bool(model.checkpoint_blocks))


def _recomputing(own_params: bool) -> bool:
    return own_params or _ON.get()


def run_blocks(blocks: Iterable[nn.Module], h: Tensor, own_params: bool = False) -> Tensor:
    """`h` through `blocks` in order, each checkpointed when asked (and only when a graph is being recorded)."""
    replaced = _REPLACED.get()
    if replaced is not None:
        return replaced(list(blocks), h)
    if not torch.is_grad_enabled() or not _recomputing(own_params):
        return _in_order(blocks, h)
    for block in blocks:
        h = checkpoint(block, h, use_reentrant=False) if own_params else _functional_checkpoint(block, h)
    return h


def _functional_checkpoint(block: nn.Module, h: Tensor) -> Tensor:
    state = dict(block.named_parameters())  # under functional_call: the substituted (e.g. adapted) tensors
    state.update(block.named_buffers())
    names = list(state)

    def run(x: Tensor, *tensors: Tensor) -> Tensor:
        return torch.func.functional_call(block, dict(zip(names, tensors)), (x,))

    return checkpoint(run, h, *state.values(), use_reentrant=False)
