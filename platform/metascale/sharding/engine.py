"""The DeepSpeed side of a rank: the engine's config from the job spec, and a ZeRO-stage-independent view of what
this rank owns (its *local* parameters and gradients).

Local means: under ZeRO-3 the rank's flat partition of each parameter (`ceil(numel / world)` elements, the last
rank's zero-padded), so nothing here ever gathers a whole model; under stages 0-2 the whole tensor, which every rank
holds anyway. The published meta-parameters are cut to this layout on arrival, and a ZeRO-3 group's meta-gradient
travels to the coordinator in it, one partition per rank (`assemble` puts the whole back together there).
"""

from __future__ import annotations

import datetime
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from metascale.config import ShardingSpec
from metascale.extras import require

Params = dict[str, Tensor]


def use_group(backend: str, timeout: datetime.timedelta) -> None:
    """Hands the rank group's torch.distributed group (cluster/rendezvous.py) to DeepSpeed. Its shared-memory
    collective (a C++ op that JIT-compiles for ~60 s on first use) is switched off: gloo or NCCL carry every
    collective, with nothing to build."""
    deepspeed = require("deepspeed")

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False, timeout=timeout)


def ds_config(s: ShardingSpec, zero_extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The engine's config. Every parameter is partitioned under ZeRO-3 (persistence threshold 0: the default keeps
    parameters under 100k elements whole on every rank); optimisers are the client's torch ones (no compiled ops).
    Gradient clipping is 0: DeepSpeed's default, 1.0, silently clipped every inner step (the first sharded FOMAML
    was 5x off), and the meta-gradient is clipped by the coordinator. One micro-batch per step: a work item's tasks
    are summed by the learners themselves, so the engine's accumulation count never spans two items. `zero_extra`:
    a learner's own zero_optimization keys."""
    zero: dict[str, Any] = {"stage": s.zero_stage, **(zero_extra or {})}
    if s.zero_stage == 3:
        zero.update(stage3_param_persistence_threshold=0, stage3_prefetch_bucket_size=0)
    if s.offload == "cpu":
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "steps_per_print": 2**31 - 1,
        "zero_optimization": zero,
        "bf16": {"enabled": s.precision == "bf16"},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
    }


def build_engine(
    make_model: Any, s: ShardingSpec, make_optimizer: Any, zero_extra: dict[str, Any] | None = None
) -> Any:
    """`make_model()` under `zero.Init` at stage 3 (each rank materialises only its partitions, never the whole
    model), then `deepspeed.initialize` with `make_optimizer(model)` as the client optimiser."""
    deepspeed = require("deepspeed")

    cfg = ds_config(s, zero_extra)
    if s.zero_stage == 3:
        with deepspeed.zero.Init(config_dict_or_path=cfg):
            model = make_model()
    else:
        model = make_model()
    if s.activation_checkpointing:
        enable_activation_checkpointing(model)
    engine, *_ = deepspeed.initialize(model=model, optimizer=make_optimizer(model), config=cfg)
    return engine


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Turns on the backbone's own per-block recomputation (torch's non-reentrant checkpoint: DeepSpeed's reentrant
    one silently gives zero gradients to a block's parameters when the block's input does not require grad)."""
    for module in model.modules():
        if hasattr(module, "checkpoint_blocks"):
            module.checkpoint_blocks = True
            return
    raise ValueError(f"{type(model).__name__} has no activation-checkpointing hook (checkpoint_blocks)")


def is_partitioned(p: Tensor) -> bool:
    return hasattr(p, "ds_id")


def partition_of(whole: np.ndarray | Tensor, rank: int, world: int) -> Tensor:
    """This rank's ZeRO-3 partition of a whole tensor (a published array, or a summed gradient on the device): flat,
    float32, `ceil(numel / world)` elements, the last rank's zero-padded. Only the partition is copied: the whole
    stays where it is (the object store, the device)."""
    flat = whole.reshape(-1)
    size = -(-flat.shape[0] // world)
    piece = flat[rank * size : (rank + 1) * size]
    if isinstance(piece, np.ndarray):  # read-only in the object store: copy the piece before torch sees it
        piece = torch.from_numpy(np.array(piece, dtype=np.float32, copy=True))
    out = piece.new_zeros(size, dtype=torch.float32)
    out[: piece.shape[0]] = piece
    return out


def assemble(partitions: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    """The whole tensor from the ranks' partitions (rank order): what the coordinator receives from a ZeRO-3 group."""
    numel = int(np.prod(shape, dtype=np.int64))
    return np.concatenate([p.reshape(-1) for p in partitions])[:numel].reshape(shape)


def local_params(engine: Any) -> Params:
    """Fp32 copies of this rank's parameters (the optimiser's master weights where it keeps any)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_local_fp32_param

    out = {}
    for name, p in engine.module.named_parameters():
        if is_partitioned(p):
            v = safe_get_local_fp32_param(p)
        else:
            v = safe_get_full_fp32_param(p)  # stages 1-2: all-reduces the fragments (every rank calls this)
            v = p.data if v is None else v
        out[name] = v.detach().float().reshape(-1 if is_partitioned(p) else p.shape).clone()
    return out


@torch.no_grad()
def set_local_params(engine: Any, values: Params) -> None:
    """Writes this rank's parameters: the master copy and the compute copy (bf16, or the same storage in fp32)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_local_fp32_param

    # ZeRO-3 may still hold whole copies gathered by a no_grad forward (nothing released them in a backward pass);
    # the next forward would use those stale copies instead of re-gathering the partitions written here.
    engine.empty_partition_cache()
    for name, p in engine.module.named_parameters():
        v = values[name]
        if is_partitioned(p):
            safe_set_local_fp32_param(p, v)
            p.ds_tensor.data.copy_(v.view(p.ds_tensor.shape))
        else:
            safe_set_full_fp32_param(p, v)
            p.data.copy_(v)


def local_grads(engine: Any) -> Params:
    """This rank's part of the gradient that the last `engine.backward` reduced (averaged over ranks)."""
    from deepspeed.utils import safe_get_full_grad, safe_get_local_grad

    out = {}
    for name, p in engine.module.named_parameters():
        g = safe_get_local_grad(p) if is_partitioned(p) else safe_get_full_grad(p)
        shape = (p.ds_tensor.numel(),) if is_partitioned(p) else p.shape
        out[name] = torch.zeros(shape) if g is None else g.detach().float().reshape(shape).clone()
    return out


def param_bytes(engine: Any, extra: list[Tensor] = ()) -> int:
    """Bytes of parameter, gradient-partition and optimiser-state storage this rank holds, each storage counted
    once: what ZeRO partitions. Activations and gathered-for-compute parameters are transient and not counted."""
    tensors: list[Tensor] = list(extra)
    for p in engine.module.parameters():
        tensors.append(p.ds_tensor if is_partitioned(p) else p.data)
    opt = engine.optimizer
    for attr in (
        "fp32_partitioned_groups_flat",
        "single_partition_of_fp32_groups",
        "fp16_partitioned_groups_flat",
        "bit16_groups_flat",
        "fp32_groups_flat_partition",
    ):
        tensors += [t for t in getattr(opt, attr, []) or [] if isinstance(t, Tensor)]
    inner = getattr(opt, "optimizer", opt)
    for state in getattr(inner, "state", {}).values():
        tensors += [t for t in state.values() if isinstance(t, Tensor)]
    seen: dict[int, int] = {}
    for t in tensors:
        if t.numel():
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
    return sum(seen.values())
