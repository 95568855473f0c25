"""The job spec: typed, validated pydantic models, the single source of every knob.

A spec is YAML; every field has a default that runs, so `name: x` alone is a valid job (sinusoid MAML).
`load_spec` turns any problem into a `SpecError` whose lines read `field.path: what was expected (got ...)`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from metascale.errors import SpecError

PositiveInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]


class Spec(BaseModel):
    """Base of every section: unknown keys are errors (a typo must never be silently ignored)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------------------------- models
class MLPSpec(Spec):
    name: Literal["mlp"] = "mlp"
    in_features: PositiveInt = 1
    hidden: list[PositiveInt] = [40, 40]


class Conv4Spec(Spec):
    """Conv-4 of the MAML paper: 'omniglot' uses stride-2 convs, 'miniimagenet' uses max-pooling."""

    name: Literal["conv4"] = "conv4"
    variant: Literal["omniglot", "miniimagenet"] = "omniglot"
    in_channels: PositiveInt = 1
    hidden: PositiveInt = 64
    image_size: PositiveInt = 28


class ResNet12Spec(Spec):
    name: Literal["resnet12"] = "resnet12"
    in_channels: PositiveInt = 3
    channels: list[PositiveInt] = [64, 160, 320, 640]
    image_size: PositiveInt = 84


class ViTSpec(Spec):
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


ModelSpec = Annotated[Union[MLPSpec, Conv4Spec, ResNet12Spec, ViTSpec], Field(discriminator="name")]


# ----------------------------------------------------------------------------------------------- data
class SinusoidData(Spec):
    """Sinusoid regression as in the MAML paper (Finn et al. 2017, section 5.1)."""

    source: Literal["sinusoid"] = "sinusoid"
    shots: PositiveInt = 10
    queries: PositiveInt = 10
    amplitude: tuple[float, float] = (0.1, 5.0)
    phase: tuple[float, float] = (0.0, math.pi)
    x_range: tuple[float, float] = (-5.0, 5.0)


class EpisodicData(Spec):
    """Knobs shared by every N-way K-shot classification source."""

    ways: PositiveInt = 5
    shots: PositiveInt = 1
    queries: PositiveInt = 15
    augment: list[Literal["rot90"]] = []


class SyntheticImagesData(EpisodicData):
    """Random class prototypes plus noise: a tiny, instant image family for tests and smoke runs."""

    source: Literal["synthetic"] = "synthetic"
    classes: PositiveInt = 64
    image_size: PositiveInt = 28
    channels: PositiveInt = 1
    noise: PositiveFloat = 0.5


class StreamSpec(Spec):
    """Bounded-memory reading of a shard set (docs/data.md): meta-step s draws its classes only from window
    s // window_steps, `window_shards` shards of a per-epoch shard permutation; a process holds at most
    `window_shards` decoded shards."""

    window_shards: PositiveInt
    window_steps: PositiveInt


class GlyphsData(EpisodicData):
    """The offline glyph set (rendered by metascale itself), packed into task shards under `root` on first use."""

    source: Literal["glyphs"] = "glyphs"
    root: str = "data/glyphs"
    image_size: Literal[28, 84] = 28
    classes: PositiveInt = 1623  # Omniglot's count; fewer renders faster (docs/data.md)
    instances: PositiveInt = 20  # "drawers" per character, as in Omniglot
    stream: StreamSpec | None = None  # None: the whole split decoded in memory


class ShardsData(EpisodicData):
    """Task shards made by `metascale data pack`, at a local path or any fsspec URL."""

    source: Literal["shards"] = "shards"
    url: str
    on_bad_sample: Literal["error", "skip"] = "error"
    stream: StreamSpec | None = None  # None: the whole split decoded in memory


class NoisyLabelsData(Spec):
    """One many-shot task (Meta-Weight-Net's setting): `ways` fixed classes of a base image family, a training set with
    symmetric label noise and/or class imbalance, a small clean meta set and a clean test set (algorithms/mwn.py)."""

    source: Literal["noisy_labels"] = "noisy_labels"
    base: Literal["synthetic", "glyphs"] = "synthetic"
    root: str = "data/glyphs"  # base 'glyphs' only
    ways: PositiveInt = 10
    train_per_class: PositiveInt = 100  # before imbalance
    meta_per_class: PositiveInt = 5  # the clean meta set
    test_per_class: PositiveInt = 20
    label_noise: Annotated[float, Field(ge=0, lt=1)] = 0.4  # fraction of training labels replaced uniformly at random
    imbalance: Annotated[float, Field(ge=1)] = 1.0  # largest / smallest class size, geometric in between
    batch: PositiveInt = 100  # training examples per step (a task's support set)
    meta_batch_size: PositiveInt = 50  # clean meta examples per step (a task's query set)
    image_size: PositiveInt = 28
    noise: PositiveFloat = 0.5  # base 'synthetic': instance noise around each class prototype


DataSpec = Annotated[
    Union[SinusoidData, SyntheticImagesData, GlyphsData, ShardsData, NoisyLabelsData], Field(discriminator="source")
]


# ------------------------------------------------------------------------------------------ algorithm
class InnerLoopSpec(Spec):
    steps: NonNegInt = 1
    lr: PositiveFloat = 0.01  # the MAML paper's sinusoid value (the default job); Omniglot-style jobs use 0.4
    first_order: bool = False
    # 'steps' recomputes each inner step in the backward pass; 'all' also the query pass, one model block at a time
    # (models/checkpointing.py: the query forward dominates a task's peak memory).
    checkpoint: Literal["none", "steps", "all"] = "none"
    # The query pass this many examples at a time (algorithms/query_chunks.py): exact with per-task batch norm, memory
    # independent of the query-set size, for a few more passes over it. MAML family and learned_hparams; per task.
    query_chunk: PositiveInt | None = None
    autocast: Literal["none", "bf16"] = "none"


CHUNKED_QUERY = ("maml", "fomaml", "metasgd", "learned_loss", "learned_hparams")


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
        "maml", "fomaml", "reptile", "anil", "metasgd", "protonet",
        "imaml", "learned_hparams", "learned_loss", "mwn", "erm",
    ] = "maml"
    inner: InnerLoopSpec = InnerLoopSpec()
    # ANIL adapts only parameters whose name starts with this prefix (the classifier head).
    head_prefix: str = "head."
    # Meta-SGD's initial per-parameter inner learning rate (defaults to inner.lr).
    metasgd_init_lr: PositiveFloat | None = None
    imaml: IMAMLSpec = IMAMLSpec()
    learned: LearnedSpec = LearnedSpec()
    mwn: MWNSpec = MWNSpec()


# -------------------------------------------------------------------------------------- outer / eval
class ESSpec(Spec):
    """Evolution strategies (outer.estimator 'es'): outer.meta_batch antithetic pairs per step, each scored on the same
    `tasks` tasks of the step (common random numbers); workers return only (pair, F+, F-)."""

    sigma: PositiveFloat = 0.02
    tasks: PositiveInt = 8
    shaping: Literal["centred_rank", "none"] = "centred_rank"
    objective: Literal["loss", "error"] = "loss"  # post-adaptation query loss, or 1 - accuracy (not differentiable)


class OuterLoopSpec(Spec):
    # How workers' results become the update direction (cluster/estimators.py).
    estimator: Literal["backprop", "es", "ftml"] = "backprop"
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: PositiveFloat = 1e-3
    meta_batch: PositiveInt = 25
    steps: PositiveInt = 1000
    grad_clip: PositiveFloat | None = None
    es: ESSpec = ESSpec()


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


class WandbSpec(Spec):
    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "metascale"
    entity: str | None = None
    dir: str = "runs/{name}"


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


class ClusterSpec(Spec):
    address: str = "local"  # 'local': embedded Ray; 'auto', 'HOST:PORT' or 'ray://HOST:PORT' to join a cluster
    workers: PositiveInt = 1
    cpus_per_worker: PositiveFloat = 1
    gpus_per_worker: Annotated[float, Field(ge=0)] = 0
    aggregation: Literal["coordinator", "allreduce"] = "coordinator"


class ShardingSpec(Spec):
    """Large backbones: the worker is a group of `ranks` processes running a DeepSpeed engine (docs/sharding.md)."""

    engine: Literal["none", "deepspeed"] = "none"
    zero_stage: Annotated[int, Field(ge=0, le=3)] = 0
    offload: Literal["none", "cpu"] = "none"  # ZeRO-Offload of the optimiser state (stage >= 1)
    activation_checkpointing: bool = False  # recompute each transformer block / residual stage in the backward pass
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    ranks: PositiveInt = 1  # processes in the group (one per GPU; gloo on CPU)
    # LITE (Bronskill et al. 2021): forward the whole support set, back-propagate a random subset of H examples.
    support_backprop_subset: PositiveInt | None = None

    @model_validator(mode="after")
    def _engine(self) -> "ShardingSpec":
        if self.engine == "none":
            knobs = {"zero_stage": 0, "offload": "none", "activation_checkpointing": False, "precision": "fp32",
                     "ranks": 1, "support_backprop_subset": None}
            for key, default in knobs.items():
                if getattr(self, key) != default:
                    raise ValueError(f"{key} needs engine: deepspeed (engine is 'none')")
        if self.precision == "fp16":
            raise ValueError(
                "precision fp16 needs loss scaling, which DeepSpeed applies only in engine.backward: inner "
                "gradients would be unscaled and an overflow would silently skip an inner step; use precision: bf16"
            )
        if self.offload == "cpu" and self.zero_stage == 0:
            raise ValueError("offload cpu needs zero_stage >= 1 (ZeRO-Offload moves ZeRO's "
                             "partitioned optimiser state)")
        return self


SECOND_ORDER = ("maml", "metasgd", "anil")  # differentiate through the inner loop unless inner.first_order
SHARDED_FIRST_ORDER = ("fomaml", "reptile")  # the inner loop runs through the engine, at every ZeRO stage


def sharding_problem(job: "JobSpec") -> str | None:
    """What makes `job.sharding` impossible with the rest of the job, and what to use instead (None: fine)."""
    s, alg = job.sharding, job.algorithm
    if s.engine == "none":
        return None
    if job.outer.estimator != "backprop":
        return (f"sharding.engine deepspeed backpropagates its meta-gradients; outer.estimator '{job.outer.estimator}' "
                "runs on the Ray workers: set sharding.engine none")
    second_order = alg.name in SECOND_ORDER and not alg.inner.first_order
    first_order_anil = alg.name == "anil" and alg.inner.first_order  # the head adapts, the sharded body is frozen
    if alg.name not in SHARDED_FIRST_ORDER and not second_order and not first_order_anil:
        return (f"sharding.engine deepspeed runs {', '.join(SHARDED_FIRST_ORDER)} and first-order anil (any "
                f"zero_stage) and second-order {', '.join(SECOND_ORDER)} (zero_stage <= 2), not algorithm '{alg.name}'"
                + (" with inner.first_order: use fomaml" if alg.name in SECOND_ORDER else "; use sharding.engine: none"))
    if second_order and s.zero_stage == 3:
        return (f"sharding.zero_stage 3 cannot run second-order '{alg.name}': torch.func needs whole parameters on "
                "every rank and ZeRO-3 keeps only partitions; use zero_stage <= 2, or algorithm fomaml/reptile")
    if s.support_backprop_subset is not None:
        if second_order:
            return ("sharding.support_backprop_subset (LITE) applies to the first-order sharded inner loop; "
                    "use algorithm fomaml or reptile")
        if job.model.name in ("conv4", "resnet12"):
            return (f"sharding.support_backprop_subset (LITE) needs examples that do not interact in the forward pass; "
                    f"model '{job.model.name}' uses per-task batch norm over the support set; use model vit")
    support, query = _episode_sizes(job.data)
    if s.support_backprop_subset is not None and s.support_backprop_subset > support:
        return (f"sharding.support_backprop_subset ({s.support_backprop_subset}) exceeds the support set "
                f"({support} examples)")
    if not second_order and s.ranks > min(support, query):
        return (f"sharding.ranks ({s.ranks}) exceeds the examples a task splits over ranks (support {support}, query "
                f"{query}); lower ranks or raise shots/queries")
    if second_order and job.outer.meta_batch % s.ranks:
        return (f"outer.meta_batch ({job.outer.meta_batch}) must be a multiple of sharding.ranks ({s.ranks}): "
                "second order splits the tasks evenly over the ranks")
    if s.activation_checkpointing and job.model.name not in ("vit", "resnet12"):
        return f"sharding.activation_checkpointing needs model vit or resnet12 (blocks to recompute), not '{job.model.name}'"
    if second_order and job.executor.nonfinite == "skip_step":
        return ("executor.nonfinite skip_step cannot be honoured by second-order sharded runs (the ZeRO optimiser "
                "steps inside the engine at the accumulation boundary); use skip_task or stop")
    if job.executor.dtype != "float32":
        return "sharding.engine deepspeed keeps float32 master weights: set executor.dtype float32 (precision sets bf16)"
    inner = job.algorithm.inner
    if inner.checkpoint != "none" or inner.query_chunk is not None or inner.autocast != "none":
        return ("algorithm.inner.checkpoint/query_chunk/autocast are the un-sharded knobs; with sharding.engine deepspeed use "
                "sharding.activation_checkpointing and sharding.precision")
    if job.cluster.workers != 1 or job.cluster.address not in ("local", "inline"):
        return ("sharding.engine deepspeed runs one rank group beside the driver: set cluster.workers 1 and "
                "cluster.address local or inline (scale with sharding.ranks)")
    return None


def _episode_sizes(data: Any) -> tuple[int, int]:
    if isinstance(data, SinusoidData):
        return data.shots, data.queries
    return getattr(data, "ways", 1) * getattr(data, "shots", 1), getattr(data, "ways", 1) * getattr(data, "queries", 1)


# ------------------------------------------------------------------------------------------- the job
class JobSpec(Spec):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")] = "job"
    seed: NonNegInt = 0
    model: ModelSpec = MLPSpec()
    data: DataSpec = SinusoidData()
    algorithm: AlgorithmSpec = AlgorithmSpec()
    outer: OuterLoopSpec = OuterLoopSpec()
    eval: EvalSpec = EvalSpec()
    checkpoint: CheckpointSpec = CheckpointSpec()
    logging: LoggingSpec = LoggingSpec()
    executor: ExecutorSpec = ExecutorSpec()
    cluster: ClusterSpec = ClusterSpec()
    sharding: ShardingSpec = ShardingSpec()

    @model_validator(mode="after")
    def _compatible(self) -> "JobSpec":
        regression = isinstance(self.data, SinusoidData)
        if regression and self.model.name != "mlp":
            raise ValueError(f"data.source 'sinusoid' needs model.name 'mlp' (got '{self.model.name}')")
        if regression and self.algorithm.name in ("protonet", "anil"):
            raise ValueError(f"algorithm '{self.algorithm.name}' needs a classification data source, not sinusoid")
        if not regression and self.model.name == "mlp":
            raise ValueError("model 'mlp' takes vectors; image data needs conv4, resnet12 or vit")
        self._survey_compatible()
        if (problem := sharding_problem(self)) is not None:
            raise ValueError(problem)
        return self

    def _survey_compatible(self) -> None:
        """Combinations of the survey's other axes (docs/survey-map.md) that cannot mean anything."""
        alg, single_task = self.algorithm, isinstance(self.data, NoisyLabelsData)
        if (alg.name in ("mwn", "erm")) != single_task:
            raise ValueError(
                f"algorithm '{alg.name}' with data.source '{self.data.source}': 'mwn' and 'erm' train one many-shot "
                "task and need data.source 'noisy_labels', which no other algorithm takes"
            )
        if alg.name in ("learned_hparams", "learned_loss") and (alg.inner.first_order or alg.inner.steps == 0):
            raise ValueError(
                f"algorithm '{alg.name}' learns through the inner loop's gradients: it needs inner.steps >= 1 and "
                "inner.first_order false (otherwise its hypergradient is zero)"
            )
        if alg.name == "imaml" and (alg.inner.steps == 0 or alg.inner.checkpoint != "none"):
            raise ValueError("algorithm 'imaml' needs inner.steps >= 1 and inner.checkpoint 'none' "
                             "(its memory is already independent of the inner steps)")
        if alg.inner.query_chunk is not None and alg.name not in CHUNKED_QUERY:
            raise ValueError(f"inner.query_chunk splits the adapted model's query pass: algorithms "
                             f"{', '.join(CHUNKED_QUERY)}, not '{alg.name}'")
        if alg.name in ("mwn", "erm") and self.executor.strategy == "vmap":
            raise ValueError(f"algorithm '{alg.name}' runs per task (executor.strategy 'per_task' or 'auto'), not vmap")
        if self.outer.estimator == "es" and alg.name in ("mwn", "erm"):
            raise ValueError(f"outer.estimator 'es' needs a few-shot task stream, not algorithm '{alg.name}'")
        if self.outer.estimator == "es" and self.outer.es.objective == "error" and isinstance(self.data, SinusoidData):
            raise ValueError("outer.es.objective 'error' needs classification data (sinusoid has no accuracy)")
        if self.cluster.aggregation == "allreduce" and self.outer.estimator != "backprop":
            raise ValueError(f"cluster.aggregation 'allreduce' sums meta-gradients (outer.estimator 'backprop'), "
                             f"not outer.estimator '{self.outer.estimator}'; use aggregation: coordinator")
        if self.cluster.aggregation == "allreduce" and self.sharding.engine != "none":
            raise ValueError("cluster.aggregation 'allreduce' is for replicated workers; with sharding.engine "
                             "deepspeed the rank group already reduces (docs/sharding.md); use aggregation: coordinator")
        if self.outer.estimator == "ftml" and single_task:
            raise ValueError("outer.estimator 'ftml' streams few-shot tasks; data.source 'noisy_labels' is one task")

    def path(self, template: str) -> str:
        return template.format(name=self.name)


# ------------------------------------------------------------------------------------------- loading
def parse_spec(raw: Any, source: str = "<spec>") -> JobSpec:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SpecError(source, [f"(top level): expected a mapping of sections, got {type(raw).__name__}"])
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as e:
        raise SpecError(source, [_describe(err) for err in e.errors()]) from None


def load_spec(path: str | Path, overrides: list[str] = ()) -> JobSpec:
    """Reads a YAML spec and applies `dotted.key=value` overrides (values parsed as YAML)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SpecError(str(path), ["file not found"]) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise SpecError(str(path), [f"{where}not valid YAML ({getattr(e, 'problem', e)})"]) from None
    raw = {} if raw is None else raw
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SpecError(str(path), [f"override '{item}': expected dotted.key=value"])
        if not isinstance(raw, dict):
            break
        _set_dotted(raw, key.split("."), yaml.safe_load(value))
    return parse_spec(raw, str(path))


def dump_spec(spec: JobSpec) -> str:
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)


def _set_dotted(raw: dict, keys: list[str], value: Any) -> None:
    for k in keys[:-1]:
        raw = raw.setdefault(k, {})
        if not isinstance(raw, dict):
            raise SpecError("<override>", [f"{'.'.join(keys)}: '{k}' is not a section"])
    raw[keys[-1]] = value


def _describe(err: dict) -> str:
    # Discriminated unions add the tag to the location (data.glyphs.ways); drop it for a path the user wrote.
    loc = [str(p) for p in err["loc"] if not str(p).startswith("function-after")]
    tags = {"mlp", "conv4", "resnet12", "vit", "sinusoid", "synthetic", "glyphs", "shards", "noisy_labels"}
    loc = [p for i, p in enumerate(loc) if not (i > 0 and p in tags and loc[i - 1] in ("model", "data"))]
    path = ".".join(loc) or "(top level)"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown field (check the spelling; see docs/job-spec.md)"
    got = err.get("input")
    shown = "" if err["type"] in ("missing", "extra_forbidden") or isinstance(got, dict) else f" (got {got!r})"
    return f"{path}: {msg}{shown}"
