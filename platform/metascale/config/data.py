"""The job spec's `data` section: the task sources (sinusoid, synthetic, glyphs, shards, noisy labels), their episode
shapes, the image pipeline's augmentation and streaming. One pydantic model each; rules across sections live in
job.py."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, Union

from pydantic import Field, field_validator, model_validator

from metascale.config.samplers import FixedSampler, SamplerSpec, _by_name
from metascale.config.halfcheetah import HalfCheetahDirData
from metascale.config.rl import NavigationData
from metascale.config.sections import PositiveFloat, PositiveInt, Spec
from metascale.config.spurious import SpuriousData


# ----------------------------------------------------------------------------------------------- data
class SinusoidData(Spec):
    """Sinusoid regression as in the MAML paper (Finn et al. 2017, section 5.1)."""

    source: Literal["sinusoid"] = "sinusoid"
    shots: PositiveInt = 10
    queries: PositiveInt = 10
    amplitude: tuple[float, float] = (0.1, 5.0)
    phase: tuple[float, float] = (0.0, math.pi)
    x_range: tuple[float, float] = (-5.0, 5.0)


def _range(v: tuple[float, float], what: str, top: float | None) -> tuple[float, float]:
    lo, hi = v
    if not 0 < lo <= hi or (top is not None and hi > top):
        raise ValueError(f"{what} must be (low, high) with 0 < low <= high{f' <= {top:g}' if top else ''}")
    return v


class CropSpec(Spec):
    """Random resized crop (as torchvision's RandomResizedCrop): a box of `scale` x the image's area with aspect
    ratio in `ratio` (log-uniform), resized back to the set's image size."""

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    @field_validator("scale")
    @classmethod
    def _scale(cls, v: tuple[float, float]) -> tuple[float, float]:
        return _range(v, "crop.scale", 1.0)

    @field_validator("ratio")
    @classmethod
    def _ratio(cls, v: tuple[float, float]) -> tuple[float, float]:
        return _range(v, "crop.ratio", None)


class JitterSpec(Spec):
    """Colour jitter (as torchvision's ColorJitter, in this fixed order): each factor drawn from [max(0, 1 - x), 1 + x]."""

    brightness: Annotated[float, Field(ge=0, le=1)] = 0.4
    contrast: Annotated[float, Field(ge=0, le=1)] = 0.4
    saturation: Annotated[float, Field(ge=0, le=1)] = 0.4


class AugmentSpec(Spec):
    """Augmentation of packed sets (data/images.py). `rot90` makes each class 4 classes in every split (the Omniglot
    practice); crop, flip and jitter change each training example, drawn per (seed, step, slot, example), on the
    train split only. A list of names (`[rot90]`, `[crop, flip]`) means those with their defaults; `crop: true` too."""

    rot90: bool = False
    crop: CropSpec | None = None
    flip: bool = False  # horizontal, with probability 1/2
    jitter: JitterSpec | None = None

    @model_validator(mode="before")
    @classmethod
    def _names(cls, v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            bad = [n for n in v if n not in cls.model_fields]
            if bad:
                raise ValueError(f"unknown augmentation {bad[0]!r} (expected some of {', '.join(cls.model_fields)})")
            return {n: True for n in v}
        return v

    @field_validator("crop", "jitter", mode="before")
    @classmethod
    def _on(cls, v: Any) -> Any:
        return {} if v is True else None if v is False else v

    @property
    def per_example(self) -> bool:
        return self.crop is not None or self.flip or self.jitter is not None

    def names(self) -> list[str]:
        return [n for n in type(self).model_fields if getattr(self, n) not in (False, None)]


class EpisodicData(Spec):
    """Knobs shared by every N-way K-shot classification source."""

    ways: PositiveInt = 5
    shots: PositiveInt = 1
    queries: PositiveInt = 15
    augment: AugmentSpec = AugmentSpec()
    # true: a packed set whose index carries the train split's per-channel mean/std is read as (x - mean) / std.
    # Off by default, so that a spec reads the same pixels whether its set was packed before stats existed or after
    # (the glyph set the main job renders on first use) and recorded results reproduce (docs/data.md).
    normalize: bool = False
    # 'fixed' (ways/shots/queries above) or 'meta_dataset' (variable ways and shots, config/samplers.py)
    sampler: SamplerSpec = FixedSampler()

    _sampler_by_name = field_validator("sampler", mode="before")(_by_name)

    @model_validator(mode="after")
    def _shape_knobs(self) -> "EpisodicData":
        """ways/shots/queries belong to the fixed sampler; judged by value (a dumped spec holds every default)."""
        if self.sampler.name != "fixed":
            moved = [
                f for f in ("ways", "shots", "queries") if getattr(self, f) != EpisodicData.model_fields[f].default
            ]
            if moved:
                raise ValueError(
                    f"{', '.join(moved)}: set by sampler 'fixed' only; sampler '{self.sampler.name}' "
                    "draws them (its min_ways, max_ways, max_queries, max_support)"
                )
            if getattr(self, "stream", None) is not None:
                raise ValueError(f"sampler '{self.sampler.name}' reads the whole split (no stream)")
        return self

    @property
    def variable(self) -> bool:
        """Episodes of different shapes (they do not stack into one TaskBatch)."""
        return self.sampler.name != "fixed"

    @property
    def max_ways(self) -> int:
        return self.sampler.max_ways if self.variable else self.ways


class SyntheticImagesData(EpisodicData):
    """Random class prototypes plus noise: a tiny, instant image family for tests and smoke runs."""

    source: Literal["synthetic"] = "synthetic"
    classes: PositiveInt = 64
    image_size: PositiveInt = 28
    channels: PositiveInt = 1
    noise: PositiveFloat = 0.5

    @model_validator(mode="after")
    def _no_augment(self) -> "SyntheticImagesData":
        if self.augment.names():
            raise ValueError("augment applies to packed sets (source: shards or glyphs), not to synthetic images")
        if self.variable:
            raise ValueError(
                "sampler 'meta_dataset' samples packed sets' class sizes (source: shards, glyphs or "
                "multi), synthetic images have none"
            )
        return self


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


SAMPLE_SPLITS = {"train": "train-*.tar", "val": "val-*.tar", "test": "test-*.tar"}  # layout samples' default


class ShardsData(EpisodicData):
    """Task shards made by `metascale data pack`, at a local path or any fsspec URL."""

    source: Literal["shards"] = "shards"
    url: str
    on_bad_sample: Literal["error", "skip"] = "error"
    stream: StreamSpec | None = None  # None: the whole split decoded in memory
    # 'classes': a set made by `metascale data pack` (one sample per class, index.json). 'samples': standard
    # per-sample WebDataset tars from other tools (KEY.jpg/png/... + KEY.cls), read member by member (data/samples.py).
    layout: Literal["classes", "samples"] = "classes"
    # layout 'samples': each split's shards relative to `url`, a brace pattern ('train-{000000..000015}.tar') or, for
    # a local set, a glob. Splits are by class: a class label found in two splits' shards is an error.
    splits: dict[Literal["train", "val", "test"], Annotated[str, Field(min_length=1)]] = SAMPLE_SPLITS
    # layout 'samples': the class index file; None: `metascale-index.json` beside a local set, a per-URL file under
    # ~/.cache/metascale/indexes/ for a remote one.
    index: Annotated[str, Field(min_length=1)] | None = None

    @model_validator(mode="after")
    def _layout(self) -> "ShardsData":
        if self.layout == "classes":
            # by value, not by fields set: a dumped spec (submit's packaged copy) holds every default and must load
            extra = [f for f, default in (("splits", SAMPLE_SPLITS), ("index", None)) if getattr(self, f) != default]
            if extra:
                raise ValueError(f"{', '.join(extra)}: only for layout 'samples'")
        else:
            if self.stream is not None:
                raise ValueError("stream: only for layout 'classes' (layout 'samples' reads single members already)")
            if self.on_bad_sample != "error":
                raise ValueError(
                    "on_bad_sample 'skip': only for layout 'classes' (episodes must not depend on "
                    "which members failed to decode)"
                )
            if self.url.startswith("pipe:"):
                raise ValueError(
                    "layout 'samples' reads byte ranges: a pipe: url cannot do that (use a path, "
                    "file://, s3:// or http(s)://)"
                )
        return self


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


class SourceSpec(Spec):
    """One packed set of a multi-source mix: where it is (as ShardsData), its weight, the splits it serves."""

    url: str
    weight: PositiveFloat = 1.0
    layout: Literal["classes", "samples"] = "classes"
    splits: dict[Literal["train", "val", "test"], Annotated[str, Field(min_length=1)]] = SAMPLE_SPLITS
    index: Annotated[str, Field(min_length=1)] | None = None
    on_bad_sample: Literal["error", "skip"] = "error"
    # the splits whose episodes may come from this set (Meta-Dataset keeps some sets for testing only)
    serves: Annotated[list[Literal["train", "val", "test"]], Field(min_length=1)] = ["train", "val", "test"]


class MultiData(EpisodicData):
    """Several packed sets (data/multi.py): each episode draws its set by weight among those serving its split,
    then its classes and examples from that set. All sets must hold images of one shape."""

    source: Literal["multi"] = "multi"
    sources: Annotated[list[SourceSpec], Field(min_length=2)]

    @model_validator(mode="after")
    def _sources(self) -> "MultiData":
        for i in range(len(self.sources)):
            try:
                self.source_spec(i)
            except ValueError as e:  # pydantic's ValidationError: its first error's message
                msg = e.errors()[0]["msg"] if hasattr(e, "errors") else str(e)
                raise ValueError(f"sources[{i}]: {msg.removeprefix('Value error, ')}") from None
        return self

    def source_spec(self, i: int) -> ShardsData:
        """Source i as a one-set spec with this mix's episode knobs (what its reader takes)."""
        src = self.sources[i]
        keep = {k: getattr(self, k) for k in EpisodicData.model_fields}
        return ShardsData(
            url=src.url, layout=src.layout, splits=src.splits, index=src.index, on_bad_sample=src.on_bad_sample, **keep
        )

    def serving(self, split: str) -> list[int]:
        return [i for i, s in enumerate(self.sources) if split in s.serves]


GlyphStyle = Literal["plain", "thin", "bold", "slant", "rotated", "small"]  # data/domains.py: one domain each


class DomainsData(Spec):
    """Domain generalisation (MLDG's setting, data/domains.py): `ways` glyph classes rendered in each stroke style of
    `domains`, one a domain; `target` is held out (test split), the others are the sources a train step samples
    `batch` examples from per domain, `meta_test_domains` of them as the step's meta-test domains."""

    source: Literal["domains"] = "domains"
    ways: PositiveInt = 10
    domains: list[GlyphStyle] = ["thin", "bold", "slant", "small", "rotated"]
    target: GlyphStyle = "rotated"
    per_class: PositiveInt = 20  # training images per class and source domain
    test_per_class: PositiveInt = 10  # held-out images per class and domain (target: test split; sources: val)
    batch: PositiveInt = 20  # examples per domain in a train step
    eval_batch: PositiveInt = 50  # examples per evaluation slot
    meta_test_domains: PositiveInt = 1
    image_size: PositiveInt = 28

    @model_validator(mode="after")
    def _domains(self) -> "DomainsData":
        if len(set(self.domains)) != len(self.domains):
            raise ValueError("domains: each style at most once")
        if self.target not in self.domains:
            raise ValueError(f"target '{self.target}' is not one of domains {self.domains}")
        if len(self.domains) - 1 < self.meta_test_domains + 1:
            raise ValueError(
                f"{len(self.domains) - 1} source domains cannot be split into meta-train and "
                f"{self.meta_test_domains} meta-test domain(s): add domains or lower meta_test_domains"
            )
        if self.batch > self.ways * self.per_class:
            raise ValueError(
                f"batch ({self.batch}) exceeds a domain's training images (ways x per_class = "
                f"{self.ways * self.per_class})"
            )
        return self


DataSpec = Annotated[
    Union[
        SinusoidData,
        SyntheticImagesData,
        GlyphsData,
        ShardsData,
        MultiData,
        NoisyLabelsData,
        DomainsData,
        NavigationData,
        HalfCheetahDirData,
        SpuriousData,
    ],
    Field(discriminator="source"),
]
