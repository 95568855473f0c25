"""The job spec's sections (model, algorithm, outer/eval, logging, cluster, sharding; `data` is in data.py): one
pydantic model each, every field with a default that runs, unknown keys rejected. Rules across sections live in job.py."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from pydantic import Field, field_validator, model_validator

from metascale.config.base import NonNegFloat, NonNegInt, PositiveFloat, PositiveInt, Spec
from metascale.config.lopt import LOptSpec, PESSpec
from metascale.config.rl import MAMLRLSpec
from metascale.config.survey import ABMLSpec, BlackBoxSpec, DartsAlgorithmSpec, DistillSpec, MLDGSpec


# --------------------------------------------------------------------------------------------- models
_DOTTED = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*"


class ModelInit(Spec):
    """Fields every model has: starting weights from a file on disk instead of the random initialisation
    (models/init_from.py; a fresh run only: --resume takes the checkpoint's)."""

    init_from: Annotated[str, Field(min_length=1)] | None = None  # a .safetensors file or a torch state dict
    # The submodule the file's keys are relative to: '' the whole model (e.g. a `metascale export`), 'body' a custom
    # model's backbone (the backbone's own state_dict()). Under '' the file may lack the head or hold one of another
    # size (a new N-way head): the head then keeps its random initialisation.
    init_into: str = ""

    @field_validator("init_into")
    @classmethod
    def _submodule(cls, v: str) -> str:
        if v and not re.fullmatch(_DOTTED, v):
            raise ValueError(f"'{v}' is not a submodule name such as 'body' or 'body.blocks'")
        return v


class MLPSpec(ModelInit):
    name: Literal["mlp"] = "mlp"
    in_features: PositiveInt = 1
    hidden: list[PositiveInt] = [40, 40]


class Conv4Spec(ModelInit):
    """Conv-4 of the MAML paper: 'omniglot' uses stride-2 convs, 'miniimagenet' uses max-pooling."""

    name: Literal["conv4"] = "conv4"
    variant: Literal["omniglot", "miniimagenet"] = "omniglot"
    in_channels: PositiveInt = 1
    hidden: PositiveInt = 64
    image_size: PositiveInt = 28


class ResNet12Spec(ModelInit):
    name: Literal["resnet12"] = "resnet12"
    in_channels: PositiveInt = 3
    channels: list[PositiveInt] = [64, 160, 320, 640]
    image_size: PositiveInt = 84


class ViTSpec(ModelInit):
    """A plain ViT whose size the spec sets; the reference large backbone."""

    name: Literal["vit"] = "vit"
    in_channels: PositiveInt = 1
    image_size: PositiveInt = 28
    patch_size: PositiveInt = 7
    dim: PositiveInt = 64
    depth: PositiveInt = 4
    heads: PositiveInt = 4
    mlp_ratio: PositiveFloat = 4.0

    @model_validator(mode="after")
    def _shapes(self) -> "ViTSpec":
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})")
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be a multiple of heads ({self.heads})")
        return self


class CustomModelSpec(ModelInit):
    """A user's own backbone (models/custom.py): `target` 'package.module:ClassOrFactory' called with `kwargs` gives a
    module mapping inputs to features (batch, D); metascale adds the `head` and runs batch norm per task."""

    name: Literal["custom"] = "custom"
    target: str
    kwargs: dict[str, Any] = {}
    feature_dim: PositiveInt | None = None  # D, when the module has no `feature_dim` or `num_features` attribute

    @field_validator("target")
    @classmethod
    def _import_path(cls, v: str) -> str:
        if not re.fullmatch(rf"{_DOTTED}:{_DOTTED}", v):
            raise ValueError(f"'{v}' is not an import path 'package.module:ClassOrFactory'")
        return v


DartsOp = Literal["none", "skip", "conv3", "conv5", "dil_conv3", "max_pool", "avg_pool"]  # models/darts.py: OPS


class DartsSpec(ModelInit):
    """A DARTS search network (models/darts.py): `cells` cells of `nodes` nodes whose edges mix `ops` by
    softmax(alpha); a 3x3 stride-2 stem and a 2x2 max-pool after every cell."""

    name: Literal["darts"] = "darts"
    in_channels: PositiveInt = 1
    image_size: PositiveInt = 28
    channels: PositiveInt = 16
    cells: PositiveInt = 2
    nodes: PositiveInt = 2
    ops: list[DartsOp] = ["none", "skip", "conv3", "dil_conv3", "max_pool", "avg_pool"]
    # One op per edge (architecture.json's edge order: node0 <- input, node1 <- input, node1 <- node0, ...): a fixed
    # discrete cell, no alpha (retraining a derived or a random cell); null: the searchable mixture
    genotype: list[DartsOp] | None = None

    @model_validator(mode="after")
    def _searchable(self) -> "DartsSpec":
        if len(set(self.ops)) != len(self.ops):
            raise ValueError(f"ops {self.ops} lists an op twice")
        if not set(self.ops) - {"none"}:
            raise ValueError("ops needs an op besides 'none' (the derived architecture picks one per edge)")
        if ((self.image_size + 1) // 2) >> self.cells == 0:
            raise ValueError(
                f"image_size {self.image_size} is too small for the stem and {self.cells} cells (each halves it)"
            )
        edges = self.nodes * (self.nodes + 1) // 2
        if self.genotype is not None and len(self.genotype) != edges:
            raise ValueError(f"genotype lists {len(self.genotype)} ops; a cell of {self.nodes} nodes has {edges} edges")
        bad = sorted({o for o in self.genotype or [] if o == "none" or o not in self.ops})
        if bad:
            raise ValueError(f"genotype op(s) {bad} must be among ops and not 'none' (the search space's cells)")
        return self


ModelSpec = Annotated[
    Union[MLPSpec, Conv4Spec, ResNet12Spec, ViTSpec, CustomModelSpec, DartsSpec], Field(discriminator="name")
]


# ------------------------------------------------------------------------------------------ algorithm
class InnerLoopSpec(Spec):
    steps: NonNegInt = 1
    lr: PositiveFloat = 0.01  # the MAML paper's sinusoid value (the default job); Omniglot-style jobs use 0.4
    first_order: bool = False
    # 'steps' recomputes each inner step in the backward pass; 'all' also the query pass, one model block at a time
    # (models/checkpointing.py: the query forward dominates a task's peak memory).
    checkpoint: Literal["none", "steps", "all"] = "none"
    # The query pass this many examples at a time (algorithms/query_chunks.py): exact with per-task batch norm; holds a
    # chunk's activations and the query set's maps at stage boundaries, for a few more passes over each stage. This
    # many where the maps are largest, proportionally more where they are smaller. MAML family and learned_hparams;
    # per task.
    query_chunk: PositiveInt | None = None
    autocast: Literal["none", "bf16"] = "none"
    # How second-order algorithms differentiate through the inner loop (same numbers): 'reverse' keeps every step's
    # double-backward graph; 'mixed' keeps only each step's parameters and sweeps back with forward-over-reverse
    # Hessian-vector products (algorithms/mixed_mode.py; memory/time model in docs/architecture.md).
    differentiation: Literal["reverse", "mixed"] = "reverse"
    # 'mixed' keeps the weights of every `mixed_stride`-th step and recomputes the others in the backward pass, one
    # stretch at a time: about K/s + s weight copies instead of K, for K - K/s more plain gradients (s ~ sqrt(K) is
    # the lowest peak). 1 keeps every step.
    mixed_stride: PositiveInt = 1
    # 'mixed' runs its support gradients and products one model block at a time (algorithms/block_products.py): one
    # block's activations and tangents alive instead of the whole model's, for one more forward per block per
    # gradient and per product. false: over the whole model (one jvp of grad), the faster where memory allows.
    mixed_blocks: bool = True
    # 'mixed' computes its support gradients and Hessian-vector products this many support examples at a time and
    # sums them (the same numbers): a product holds one chunk's activations instead of the support set's. Exact where
    # examples are independent (mlp, vit) or coupled only by per-task batch norm inside the model's blocks (conv4,
    # resnet12: each block's statistics are made explicit, algorithms/norm_chunks.py; there this many where the maps
    # are largest, and proportionally more where they are smaller). Reverse mode cannot gain this way: its double
    # backward needs every chunk's graph at once.
    support_chunk: PositiveInt | None = None


CHUNKED_QUERY = ("maml", "fomaml", "metasgd", "learned_loss", "learned_hparams")
MIXED_MODE = ("maml", "metasgd", "learned_hparams", "learned_loss")  # second order through the whole model
# models whose outputs for one example read no other example (no batch statistics): inner.support_chunk is exact
PER_EXAMPLE_MODELS = ("mlp", "vit")
# models whose only link between examples is per-task batch norm inside the blocks mixed mode splits them at: there
# inner.support_chunk runs each block in chunks with its batch statistics explicit (algorithms/norm_chunks.py)
BLOCK_NORM_MODELS = ("conv4", "resnet12")


class IMAMLSpec(Spec):
    """iMAML: the inner problem is min L(phi) + reg/2 ||phi - theta||^2; CG solves (I + H/reg) v = grad L_query."""

    reg: PositiveFloat = 2.0
    cg_steps: PositiveInt = 5
    # Levenberg-Marquardt damping of H in the CG system: (I + (H + damping I)/reg) v = grad L_query. Short of the
    # inner minimum I + H/reg can be indefinite and CG then blows up (algorithms/imaml.py); 22 is the reference
    # code's system (2I + H/12 at reg 2) up to scale. 0 solves the exact implicit system.
    damping: NonNegFloat = 22.0
    # The inner solver: `gd` takes inner.steps fixed steps of inner.lr; `line_search` backtracks from inner.lr each
    # step (Armijo), so it reaches the proximal minimum the implicit gradient assumes (algorithms/imaml.py).
    solver: Literal["gd", "line_search"] = "gd"


class LearnedSpec(Spec):
    """Meta-representations beyond the initialisation (algorithms/learned_hparams.py, learned_loss.py)."""

    init_weight_decay: Annotated[float, Field(ge=0)] = 0.0  # learned_hparams: per-layer inner weight decay at start
    loss_hidden: PositiveInt = 32  # learned_loss: width of the loss network


class MWNSpec(Spec):
    """Meta-Weight-Net: a 1 -> hidden -> 1 sigmoid net from an example's loss to its weight (Shu et al. 2019)."""

    hidden: PositiveInt = 100


class AlgorithmSpec(Spec):
    name: Literal[
        "maml",
        "fomaml",
        "reptile",
        "anil",
        "metasgd",
        "protonet",
        "imaml",
        "learned_hparams",
        "learned_loss",
        "mwn",
        "erm",
        "mldg",
        "erm_pooled",
        "distill",
        "darts",
        "lopt",
        "blackbox",
        "abml",
        "maml_rl",
    ] = "maml"
    inner: InnerLoopSpec = InnerLoopSpec()
    # ANIL adapts only parameters whose name starts with this prefix (the classifier head).
    head_prefix: str = "head."
    # Meta-SGD's initial per-parameter inner learning rate (defaults to inner.lr).
    metasgd_init_lr: PositiveFloat | None = None
    imaml: IMAMLSpec = IMAMLSpec()
    learned: LearnedSpec = LearnedSpec()
    mwn: MWNSpec = MWNSpec()
    mldg: MLDGSpec = MLDGSpec()
    distill: DistillSpec = DistillSpec()
    darts: DartsAlgorithmSpec = DartsAlgorithmSpec()
    lopt: LOptSpec = LOptSpec()
    blackbox: BlackBoxSpec = BlackBoxSpec()
    abml: ABMLSpec = ABMLSpec()
    maml_rl: MAMLRLSpec = MAMLRLSpec()


# -------------------------------------------------------------------------------------- outer / eval
class ESSpec(Spec):
    """Evolution strategies (outer.estimator 'es'): outer.meta_batch antithetic pairs per step, each scored on the same
    `tasks` tasks of the step (common random numbers); workers return only (pair, F+, F-)."""

    sigma: PositiveFloat = 0.02
    tasks: PositiveInt = 8
    shaping: Literal["centred_rank", "none"] = "centred_rank"
    objective: Literal["loss", "error"] = "loss"  # post-adaptation query loss, or 1 - accuracy (not differentiable)


class LRScheduleSpec(Spec):
    """The meta learning rate over outer.steps (cluster/optim.py): a linear warm-up, then outer.lr, then a decay
    over the last `decay_steps` (all steps after the warm-up when unset) to outer.lr * final_ratio."""

    warmup_steps: NonNegInt = 0
    decay: Literal["none", "cosine", "linear"] = "none"
    decay_steps: PositiveInt | None = None
    final_ratio: Annotated[float, Field(ge=0, le=1)] = 0.0


class OuterLoopSpec(Spec):
    # How workers' results become the update direction (cluster/estimators.py).
    estimator: Literal["backprop", "es", "ftml", "pes", "tbptt"] = "backprop"
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: PositiveFloat = 1e-3
    schedule: LRScheduleSpec = LRScheduleSpec()
    meta_batch: PositiveInt = 25
    steps: PositiveInt = 1000
    grad_clip: PositiveFloat | None = None
    es: ESSpec = ESSpec()
    pes: PESSpec = PESSpec()

    @model_validator(mode="after")
    def _schedule_fits(self) -> "OuterLoopSpec":
        s = self.schedule
        if s.decay == "none" and s.decay_steps is not None:
            raise ValueError(f"schedule.decay_steps ({s.decay_steps}) needs schedule.decay 'cosine' or 'linear'")
        if s.warmup_steps + (s.decay_steps or 0) > self.steps:
            raise ValueError(
                f"schedule.warmup_steps ({s.warmup_steps}) + schedule.decay_steps ({s.decay_steps}) "
                f"must fit in outer.steps ({self.steps})"
            )
        return self


class EvalSpec(Spec):
    every: NonNegInt = 100  # 0: only at the end
    episodes: PositiveInt = 100  # during training
    final_episodes: PositiveInt = 600  # the field reports >= 600 episodes with a 95% interval
    inner_steps: NonNegInt | None = None  # test-time adaptation steps (default: algorithm.inner.steps)
    split: Literal["val", "test"] = "test"


class CheckpointSpec(Spec):
    dir: str = "runs/{name}/checkpoints"  # local path or fsspec URL; {name} is the job name
    every: NonNegInt = 100  # 0: only at the end and on SIGTERM
    keep: PositiveInt = 3


WandbTag = Annotated[str, Field(min_length=1, max_length=64)]  # W&B refuses an empty tag or one over 64 characters


class WandbSpec(Spec):
    """The W&B run (monitor.py). `auto`: online when WANDB_API_KEY is set (a RayJob passes it from a Secret),
    offline otherwise, so a machine without a key never tries the network; WANDB_MODE, when set, decides instead."""

    mode: Literal["auto", "offline", "online", "disabled"] = "auto"
    project: str = "metascale"
    entity: str | None = None
    dir: str = "runs/{name}"
    group: Annotated[str, Field(min_length=1, max_length=128)] | None = None  # e.g. a sweep or an ablation's runs
    tags: list[WandbTag] = []
    notes: str | None = None
    job_type: Annotated[str, Field(min_length=1, max_length=64)] = "train"
    # Checkpoints as W&B `model` artifacts (aliases `latest` and `best`): none; final (the run's last checkpoint,
    # uploaded once the run ends); all (every checkpoint as it is written).
    log_checkpoints: Literal["none", "final", "all"] = "final"


class LoggingSpec(Spec):
    wandb: WandbSpec = WandbSpec()
    progress: bool = True
    every: PositiveInt = 1


class ExecutorSpec(Spec):
    """How a worker runs its tasks: 'auto' picks per device (on CPU a per-task loop beats vmap)."""

    strategy: Literal["auto", "per_task", "vmap"] = "auto"
    dtype: Literal["float32", "float64"] = "float32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: PositiveInt = 1  # torch threads per worker process; >1 oversubscribes a shared CPU
    nonfinite: Literal["skip_task", "skip_step", "stop"] = "skip_task"
    # A run whose meta-gradient is unusable (every task non-finite, or skip_step) this many meta-steps in a row stops
    # with an error, after a checkpoint: it has diverged, and skipping on would only burn the budget.
    max_skipped_steps: PositiveInt = 3


class TimeoutSpec(Spec):
    """How long the coordinator waits for a worker before treating it as lost (cluster/pool.py): a lost worker is
    ended and started again, and its slots are recomputed, so a hung process costs time, never the run."""

    startup_s: PositiveFloat = 600.0  # a (re)started worker's first call: imports, DeepSpeed engine, data
    min_s: PositiveFloat = 120.0  # a call's limit is never shorter than this...
    factor: PositiveFloat = 10.0  # ...and otherwise `factor` x the slowest call of the same kind so far


class ClusterSpec(Spec):
    address: str = "local"  # 'local': embedded Ray; 'auto', 'HOST:PORT' or 'ray://HOST:PORT' to join a cluster
    workers: PositiveInt = 1  # replicas, or rank groups of sharding.ranks processes each
    cpus_per_process: PositiveFloat = 1  # per worker process: a replica, or one rank of a rank group
    gpus_per_process: Annotated[float, Field(ge=0)] = 0
    aggregation: Literal["coordinator", "allreduce"] = "coordinator"
    timeout: TimeoutSpec = TimeoutSpec()


class ShardingSpec(Spec):
    """Large backbones: each worker is a rank group, `ranks` Ray actors running one DeepSpeed engine together
    (docs/sharding.md)."""

    engine: Literal["none", "deepspeed"] = "none"
    zero_stage: Annotated[int, Field(ge=0, le=3)] = 0
    offload: Literal["none", "cpu"] = "none"  # ZeRO-Offload of the optimiser state (stage >= 1)
    activation_checkpointing: bool = (
        False  # recompute each transformer half-block (attention, MLP) / residual stage in the backward pass
    )
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    ranks: PositiveInt = 1  # processes in the group (one per GPU; gloo on CPU)
    # A group's ranks share one node (STRICT_PACK placement) unless a group is bigger than a node: then PACK, which
    # fills nodes in turn and lets the group's collectives cross the network.
    span_nodes: bool = False
    # LITE (Bronskill et al. 2021): forward the whole support set, back-propagate a random subset of H examples.
    support_backprop_subset: PositiveInt | None = None

    @model_validator(mode="after")
    def _engine(self) -> "ShardingSpec":
        if self.engine == "none":
            knobs = {
                "zero_stage": 0,
                "offload": "none",
                "activation_checkpointing": False,
                "precision": "fp32",
                "ranks": 1,
                "span_nodes": False,
                "support_backprop_subset": None,
            }
            for key, default in knobs.items():
                if getattr(self, key) != default:
                    raise ValueError(f"{key} needs engine: deepspeed (engine is 'none')")
        if self.precision == "fp16":
            raise ValueError(
                "precision fp16 needs loss scaling, which DeepSpeed applies only in engine.backward: inner "
                "gradients would be unscaled and an overflow would silently skip an inner step; use precision: bf16"
            )
        if self.offload == "cpu" and self.zero_stage == 0:
            raise ValueError(
                "offload cpu needs zero_stage >= 1 (ZeRO-Offload moves ZeRO's partitioned optimiser state)"
            )
        return self
