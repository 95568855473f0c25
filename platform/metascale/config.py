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


class GlyphsData(EpisodicData):
    """The offline glyph set (rendered by metascale itself), packed into task shards under `root` on first use."""

    source: Literal["glyphs"] = "glyphs"
    root: str = "data/glyphs"
    image_size: Literal[28, 84] = 28
    classes: PositiveInt = 1623  # Omniglot's count; fewer renders faster (docs/data.md)
    instances: PositiveInt = 20  # "drawers" per character, as in Omniglot


class ShardsData(EpisodicData):
    """Task shards made by `metascale data pack`, at a local path or any fsspec URL."""

    source: Literal["shards"] = "shards"
    url: str
    on_bad_sample: Literal["error", "skip"] = "error"


DataSpec = Annotated[
    Union[SinusoidData, SyntheticImagesData, GlyphsData, ShardsData], Field(discriminator="source")
]


# ------------------------------------------------------------------------------------------ algorithm
class InnerLoopSpec(Spec):
    steps: NonNegInt = 1
    lr: PositiveFloat = 0.4
    first_order: bool = False
    # 'steps' recomputes each inner step in the backward pass; 'all' also the query forward (most memory saved).
    checkpoint: Literal["none", "steps", "all"] = "none"
    autocast: Literal["none", "bf16"] = "none"


class AlgorithmSpec(Spec):
    name: Literal["maml", "fomaml", "reptile", "anil", "metasgd", "protonet"] = "maml"
    inner: InnerLoopSpec = InnerLoopSpec()
    # ANIL adapts only parameters whose name starts with this prefix (the classifier head).
    head_prefix: str = "head."
    # Meta-SGD's initial per-parameter inner learning rate (defaults to inner.lr).
    metasgd_init_lr: PositiveFloat | None = None


# -------------------------------------------------------------------------------------- outer / eval
class OuterLoopSpec(Spec):
    # How workers' results become the update direction (cluster/estimators.py).
    estimator: Literal["backprop"] = "backprop"
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: PositiveFloat = 1e-3
    meta_batch: PositiveInt = 25
    steps: PositiveInt = 1000
    grad_clip: PositiveFloat | None = None


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

    @model_validator(mode="after")
    def _compatible(self) -> "JobSpec":
        regression = isinstance(self.data, SinusoidData)
        if regression and self.model.name != "mlp":
            raise ValueError(f"data.source 'sinusoid' needs model.name 'mlp' (got '{self.model.name}')")
        if regression and self.algorithm.name in ("protonet", "anil"):
            raise ValueError(f"algorithm '{self.algorithm.name}' needs a classification data source, not sinusoid")
        if not regression and self.model.name == "mlp":
            raise ValueError("model 'mlp' takes vectors; image data needs conv4, resnet12 or vit")
        return self

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
    tags = {"mlp", "conv4", "resnet12", "vit", "sinusoid", "synthetic", "glyphs", "shards"}
    loc = [p for i, p in enumerate(loc) if not (i > 0 and p in tags and loc[i - 1] in ("model", "data"))]
    path = ".".join(loc) or "(top level)"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown field (check the spelling; see docs/job-spec.md)"
    got = err.get("input")
    shown = "" if err["type"] in ("missing", "extra_forbidden") or isinstance(got, dict) else f" (got {got!r})"
    return f"{path}: {msg}{shown}"
