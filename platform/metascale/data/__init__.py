"""Task data: where episodes come from. `build_task_source` maps a job spec's data section to a TaskSource."""

from __future__ import annotations

from metascale.config import DataSpec, GlyphsData, NoisyLabelsData, ShardsData, SinusoidData, SyntheticImagesData
from metascale.data.tasks import Split, Task, TaskBatch, TaskSource


def build_task_source(spec: DataSpec, split: Split, seed: int) -> TaskSource:
    from metascale.data.synthetic import SinusoidTasks, SyntheticImageTasks

    if isinstance(spec, SinusoidData):
        return SinusoidTasks(spec, split, seed)
    if isinstance(spec, SyntheticImagesData):
        return SyntheticImageTasks(spec, split, seed)
    if isinstance(spec, GlyphsData):  # rendered and packed under spec.root on first use, then reused
        from metascale.data.glyphs import GlyphSetSpec, prepare_glyphs

        root = prepare_glyphs(spec.root, GlyphSetSpec(spec.image_size, spec.classes, spec.instances))
        return _shard_tasks(spec, split, seed, str(root), "error")
    if isinstance(spec, ShardsData):
        return _shard_tasks(spec, split, seed, spec.url, spec.on_bad_sample)
    if isinstance(spec, NoisyLabelsData):  # one many-shot task (Meta-Weight-Net's setting)
        from metascale.data.noisy_labels import NoisyLabelTasks

        return NoisyLabelTasks(spec, split, seed)
    raise NotImplementedError(f"data source '{spec.source}'")


def _shard_tasks(spec: GlyphsData | ShardsData, split: Split, seed: int, root: str, on_bad: str) -> TaskSource:
    """The whole split decoded in memory, or with `stream` set a window of shards at a time (data/stream.py)."""
    if spec.stream is not None:
        from metascale.data.stream import StreamTasks

        return StreamTasks(spec, spec.stream, split, seed, root, on_bad)
    from metascale.data.episodes import ShardTasks

    return ShardTasks(spec, split, seed, root, on_bad)


def output_dim(spec: DataSpec) -> int:
    """What the model's head must produce: 1 for sinusoid regression, `ways` logits for classification."""
    return 1 if isinstance(spec, SinusoidData) else spec.ways


__all__ = ["Split", "Task", "TaskBatch", "TaskSource", "build_task_source", "output_dim"]
