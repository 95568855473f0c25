"""Task data: where episodes come from. `build_task_source` maps a job spec's data section to a TaskSource."""

from __future__ import annotations

import logging

from metascale.config import (
    DataSpec,
    DomainsData,
    GlyphsData,
    HalfCheetahDirData,
    JobSpec,
    MultiData,
    NavigationData,
    NoisyLabelsData,
    ShardsData,
    SinusoidData,
    SyntheticImagesData,
)
from metascale.config.halfcheetah import ACTION_DIM
from metascale.config.spurious import SpuriousData
from metascale.data.tasks import Split, Task, TaskBatch, TaskSource
from metascale.errors import DataError

log = logging.getLogger(__name__)


def build_task_source(spec: DataSpec, split: Split, seed: int) -> TaskSource:
    from metascale.data.synthetic import SinusoidTasks, SyntheticImageTasks

    if isinstance(spec, SinusoidData):
        return SinusoidTasks(spec, split, seed)
    if isinstance(spec, SyntheticImagesData):
        return SyntheticImageTasks(spec, split, seed)
    if isinstance(spec, ShardsData) and spec.layout == "samples":  # per-sample WebDataset tars
        from metascale.data.sample_tasks import SampleTasks

        return SampleTasks(spec, split, seed)
    if isinstance(spec, (GlyphsData, ShardsData)):
        return _shard_tasks(spec, split, seed, *_shard_root(spec))
    if isinstance(spec, MultiData):  # several packed sets, one per episode
        from metascale.data.multi import MultiTasks

        return MultiTasks(spec, split, seed)
    if isinstance(spec, NoisyLabelsData):  # one many-shot task (Meta-Weight-Net's setting)
        from metascale.data.noisy_labels import NoisyLabelTasks

        return NoisyLabelTasks(spec, split, seed)
    if isinstance(spec, DomainsData):  # glyph stroke styles as domains (MLDG's setting)
        from metascale.data.domains import DomainTasks

        return DomainTasks(spec, split, seed)
    if isinstance(spec, SpuriousData):  # an invariant and a spurious feature (MLDG vs ERM where alignment matters)
        from metascale.data.spurious import SpuriousTasks

        return SpuriousTasks(spec, split, seed)
    if isinstance(spec, NavigationData):  # goals of the 2D navigation tasks (meta-RL)
        from metascale.data.navigation import NavigationTasks

        return NavigationTasks(spec, split, seed)
    if isinstance(spec, HalfCheetahDirData):  # directions of the HalfCheetah tasks (meta-RL on MuJoCo)
        from metascale.data.halfcheetah import HalfCheetahDirTasks

        return HalfCheetahDirTasks(spec, split, seed)
    raise NotImplementedError(f"data source '{spec.source}'")


def _shard_root(spec: GlyphsData | ShardsData) -> tuple[str, str]:
    """The packed set's root and what to do with bad samples. The glyph set is rendered and packed under
    spec.root on first use, then reused."""
    if isinstance(spec, ShardsData):
        return spec.url, spec.on_bad_sample
    from metascale.data.glyphs import GlyphSetSpec, prepare_glyphs

    return str(prepare_glyphs(spec.root, GlyphSetSpec(spec.image_size, spec.classes, spec.instances))), "error"


def check_episodes(spec: JobSpec) -> None:
    """Before training: every split the job draws episodes from (train, and eval.split for evaluation) can make
    N-way episodes with shots+queries examples per class. Else a one-line DataError naming the split, instead of a
    failure at the first evaluation, or at the final one after all the training.

    Cheap: synthetic images from their class count; task shards (and the glyph set) from the index alone, no shard
    read (the glyph set is rendered here if it is not yet, which training would do next anyway), plus the window
    check of `data.stream`. Sinusoid regression and noisy_labels (a fixed `ways` classes) have nothing to check."""
    data = spec.data
    splits: list[Split] = list(dict.fromkeys(("train", spec.eval.split)))
    if isinstance(data, SyntheticImagesData):
        from metascale.data.synthetic import split_classes

        for split in splits:
            n = len(split_classes(data.classes, split))
            if n < data.ways:
                raise DataError(
                    f"data: split '{split}' has {n} classes (of data.classes={data.classes}), fewer than "
                    f"ways ({data.ways})"
                )
    elif isinstance(data, MultiData):
        from metascale.data.multi import shape_mismatch

        first: dict[str, tuple[int, tuple]] = {}
        for i in range(len(data.sources)):
            served = [sp for sp in splits if sp in data.sources[i].serves]
            if served:
                shape = _check_set(spec, data.source_spec(i), served)
                for sp in served:
                    j, want = first.setdefault(sp, (i, shape))
                    if shape != want:
                        raise DataError(shape_mismatch(data, j, want, i, shape))
    elif isinstance(data, (GlyphsData, ShardsData)):
        _check_set(spec, data, splits)


def _check_set(spec: JobSpec, data: GlyphsData | ShardsData, splits: list[Split]) -> tuple[int, int, int]:
    """`check_episodes` for one packed set; returns its image shape (C, H, W)."""
    from metascale.data.episodes import EpisodePlanner, examples_needed
    from metascale.data.index import load_index
    from metascale.data.stream import StreamTasks

    root, on_bad = _shard_root(data)
    if isinstance(data, ShardsData) and data.layout == "samples":  # builds (or reuses) the class index
        from metascale.data.samples import load_sample_index

        index = load_sample_index(data.url, data.splits, data.index).planner_view()
    else:
        index = load_index(root)
        _check_images(spec, root, index)
    counts = {i: c.count for i, c in enumerate(index.classes)}
    need = examples_needed(data)
    ways, what = (data.sampler.min_ways, "sampler.min_ways") if data.variable else (data.ways, "ways")
    for split in splits:
        try:  # with on_bad 'error', a class short of shots+queries is an error, as when training reads it
            planner = EpisodePlanner(index, split, counts, need, data.augment, spec.seed, on_bad)
        except DataError as e:
            raise DataError(f"data: {root}: {e}") from None
        if len(planner.virtual) < ways:
            total = len(index.split_classes(split))
            usable = total - planner.skipped_classes
            have = f"{total} classes"
            if planner.skipped_classes:
                have += f", {usable} of them with {'' if data.variable else 'shots+queries='}{need} examples (on_bad_sample: skip)"
            if len(planner.virtual) != usable:
                have += f" ({len(planner.virtual)} with rot90)"
            raise DataError(f"data: split '{split}' of {root} has {have}, fewer than {what} ({ways})")
        if data.stream is not None:
            StreamTasks(data, data.stream, split, spec.seed, root, on_bad).check(index)
    return tuple(index.shape)


def _check_images(spec: JobSpec, root: str, index) -> None:
    """The packed images have the model's channels (an RGB set needs model.in_channels: 3), and a note when the set
    has no normalisation stats (packed before they existed): its images stay in [0, 1]."""
    channels, want = index.shape[0], getattr(spec.model, "in_channels", None)
    if want is not None and want != channels:
        raise DataError(
            f"data: {root} holds {'RGB' if channels == 3 else f'{channels}-channel'} images, "
            f"model.in_channels is {want}"
        )
    if spec.data.normalize and index.stats is None:
        log.warning(
            "data: %s carries no normalisation stats (packed before metascale stored them): images are read "
            "in [0, 1], not normalised; re-pack it to normalise",
            root,
        )


def _shard_tasks(spec: GlyphsData | ShardsData, split: Split, seed: int, root: str, on_bad: str) -> TaskSource:
    """The whole split decoded in memory, or with `stream` set a window of shards at a time (data/stream.py)."""
    if spec.stream is not None:
        from metascale.data.stream import StreamTasks

        return StreamTasks(spec, spec.stream, split, seed, root, on_bad)
    from metascale.data.episodes import ShardTasks

    return ShardTasks(spec, split, seed, root, on_bad)


def output_dim(spec: DataSpec) -> int:
    """What the model's head must produce: 1 for sinusoid regression, `ways` logits for classification (the most
    ways an episode can have: ProtoNets' prototypes take any number up to it)."""
    if isinstance(spec, SinusoidData):
        return 1
    if isinstance(spec, NavigationData):  # the policy's mean action
        return 2
    if isinstance(spec, HalfCheetahDirData):  # the six joint torques' mean
        return ACTION_DIM
    return spec.max_ways if hasattr(spec, "max_ways") else spec.ways


__all__ = ["Split", "Task", "TaskBatch", "TaskSource", "build_task_source", "check_episodes", "output_dim"]
