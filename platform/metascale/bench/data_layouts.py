"""Per-class vs per-sample shards (`bench data`): the same episodes from the same images, packed both ways.

The glyph set's train split is metascale's per-class layout (one tall PNG per class). The same images are written
as a standard per-sample WebDataset set (one PNG + .cls per image, webdataset's ShardWriter), with the class labels
in the same order, so both layouts' planners draw identical episodes (checked). Measured in one process, 1 thread:
cold (from opening the set: index, decode or member reads, episodes) and warm (the episodes alone, caches full).
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def write_per_sample(images: np.ndarray, labels: np.ndarray, out: Path, per_shard: int = 2000) -> None:
    """uint8 [n, 1, H, W] images with their labels as `train-%06d.tar` per-sample shards, samples in image order."""
    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(out / "train-%06d.tar"), maxcount=per_shard, verbose=0) as w:
        for i, (img, label) in enumerate(zip(images, labels)):
            buf = io.BytesIO()
            Image.fromarray(img[0]).save(buf, format="PNG", compress_level=1)
            w.write({"__key__": f"{i:08d}", "png": buf.getvalue(), "cls": str(int(label)).encode()})


def run(set_dir: str, work: Path, episodes: int, meta_batch: int, repeats: int) -> dict:
    """Episodes/s of 5-way 1-shot 15-query episodes from both layouts, best of `repeats` rounds."""
    from metascale.config import GlyphsData, ShardsData
    from metascale.data.episodes import ShardTasks
    from metascale.data.sample_tasks import SampleTasks

    torch.set_num_threads(1)
    episodic = {"ways": 5, "shots": 1, "queries": 15}
    per_class = lambda: ShardTasks(GlyphsData(**episodic), "train", 0, set_dir)  # noqa: E731
    store = per_class().store
    ids = sorted(store.offsets)
    labels = np.repeat(np.array(ids), [store.counts[c] for c in ids])
    samples_dir = work / "per-sample"
    t0 = time.perf_counter()
    write_per_sample(store.images, labels, samples_dir)
    write_s = time.perf_counter() - t0
    spec = ShardsData(url=str(samples_dir), layout="samples", splits={"train": "train-*.tar"}, **episodic)
    t0 = time.perf_counter()
    SampleTasks(spec, "train", 0).index  # the one pass over the shards; stored beside them
    index_s = time.perf_counter() - t0
    per_sample = lambda: SampleTasks(spec, "train", 0)  # noqa: E731
    steps = range(max(1, episodes // meta_batch))
    n = len(steps) * meta_batch

    a, b = per_class().batch_uint8(0, range(meta_batch)), per_sample().batch_uint8(0, range(meta_batch))
    same = all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("support_x", "support_y", "query_x", "query_y"))
    if not same:
        raise RuntimeError("per-class and per-sample layouts planned different episodes from the same images")

    def rate(make) -> tuple[float, float]:
        """(cold, warm) episodes/s: cold from a fresh reader, warm the same steps again."""
        t0 = time.perf_counter()
        source = make()
        for step in steps:
            source.batch_uint8(step, range(meta_batch))
        t1 = time.perf_counter()
        for step in steps:
            source.batch_uint8(step, range(meta_batch))
        return n / (t1 - t0), n / (time.perf_counter() - t1)

    rounds = [(rate(per_class), rate(per_sample)) for _ in range(repeats)]  # alternated: load slows both alike
    pc_cold, pc_warm = (max(r[0][i] for r in rounds) for i in (0, 1))
    ps_cold, ps_warm = (max(r[1][i] for r in rounds) for i in (0, 1))
    shard_bytes = lambda d: sum(p.stat().st_size for p in Path(d).glob("*.tar"))  # noqa: E731
    return {
        "per_class_episodes_per_s_cold": round(pc_cold, 1),
        "per_class_episodes_per_s_warm": round(pc_warm, 1),
        "per_sample_episodes_per_s_cold": round(ps_cold, 1),
        "per_sample_episodes_per_s_warm": round(ps_warm, 1),
        "per_class_vs_per_sample_cold": round(pc_cold / ps_cold, 2),
        "per_class_vs_per_sample_warm": round(pc_warm / ps_warm, 2),
        "per_sample_index_build_s": round(index_s, 2),
        "per_sample_write_s": round(write_s, 2),
        "per_class_train_shard_bytes": sum(p.stat().st_size for p in Path(set_dir).glob("train-*.tar")),
        "per_sample_shard_bytes": shard_bytes(samples_dir),
        "layout_episodes": n,
        "layout_same_episodes": same,
        "layout_images": int(len(labels)),
    }
