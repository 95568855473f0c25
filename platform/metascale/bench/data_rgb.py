"""`metascale bench data --rgb`: augmented RGB 84x84 episodes/s vs a learn2learn-style per-episode pipeline, and vs
what a ResNet-12 MAML meta-step consumes.

Both sides draw 5-way 5-shot 15-query episodes from the train split of one packed RGB set and apply random resized
crop, horizontal flip and colour jitter, then normalise. metascale plans from the index, gathers from the decoded
cache and augments whole episodes in torch (data/images.py) in 2 loader workers; the baseline is what learn2learn's
TaskDataset with torchvision transforms does: per episode, sample classes and instances, and per image a PIL crop
and resize, flip, ImageEnhance brightness/contrast/saturation (torchvision's PIL path), to-tensor and normalise,
then stack. Rounds alternate the two, best of each.
"""

from __future__ import annotations

import random
import tempfile
import time

import numpy as np
import torch
from PIL import Image, ImageEnhance

from metascale.bench.data import maml_step_seconds, tune_malloc

MEAN, STD = np.array([0.5, 0.5, 0.5], np.float32), np.array([0.25, 0.25, 0.25], np.float32)


class PerImagePipeline:
    """The baseline: per-episode sampling, per-image PIL transforms, per-image tensor conversion, stacking."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, seed: int = 0):
        self.items = [(Image.fromarray(images[i].transpose(1, 2, 0)), int(labels[i])) for i in range(len(labels))]
        self.by_label: dict[int, list[int]] = {}
        for i, (_, y) in enumerate(self.items):
            self.by_label.setdefault(y, []).append(i)
        self.labels = sorted(self.by_label)
        self.rng = random.Random(seed)

    def transform(self, im: Image.Image) -> torch.Tensor:
        r, (w, h) = self.rng, im.size
        area, ratio = r.uniform(0.08, 1.0) * w * h, np.exp(r.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = min(w, round((area * ratio) ** 0.5)), min(h, round((area / ratio) ** 0.5))
        x0, y0 = r.randint(0, w - cw), r.randint(0, h - ch)
        im = im.resize((w, h), Image.Resampling.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch))
        if r.random() < 0.5:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            im = enhance(im).enhance(r.uniform(0.6, 1.4))
        x = (np.asarray(im, dtype=np.float32) / 255.0 - MEAN) / STD
        return torch.from_numpy(x.transpose(2, 0, 1).copy())

    def sample(self, ways: int, shots: int, queries: int):
        xs, ys = [], []
        for new_label, c in enumerate(self.rng.sample(self.labels, ways)):
            for i in self.rng.sample(self.by_label[c], shots + queries):
                xs.append(self.transform(self.items[i][0]))
                ys.append(new_label)
        return torch.stack(xs), torch.tensor(ys)


def _make_set(root: str, classes: int, per_class: int) -> None:
    """Smooth random RGB images (a few colour blobs per class), so PNG sizes and decode costs are photo-like."""
    from metascale.data.pack import SourceClass, pack

    rng = np.random.default_rng(0)

    def image(base: np.ndarray) -> np.ndarray:
        noise = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
        small = Image.fromarray(((base.astype(np.int32) + noise) // 2).astype(np.uint8))
        return np.asarray(small.resize((84, 84), Image.Resampling.BICUBIC), dtype=np.uint8)

    pack(
        (
            SourceClass(f"k{c}", f"k{c}", "train", [image(base) for _ in range(per_class)])
            for c, base in ((c, rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)) for c in range(classes))
        ),
        f"{root}/set",
        progress=False,
    )


def run(episodes: int, meta_batch: int, workers: int, classes: int, repeats: int = 3) -> dict:
    from metascale.config import ResNet12Spec, ShardsData
    from metascale.data.episodes import ShardTasks
    from metascale.data.loader import meta_batches

    torch.set_num_threads(1)
    tuned = tune_malloc()
    with tempfile.TemporaryDirectory(prefix="bench-rgb-") as tmp:
        t0 = time.perf_counter()
        _make_set(tmp, classes, 20)
        pack_s = time.perf_counter() - t0
        root = f"{tmp}/set"
        spec = ShardsData(
            url=root, ways=5, shots=5, queries=15, augment={"crop": True, "flip": True, "jitter": True}, normalize=True
        )
        steps = range(episodes // meta_batch)
        n = len(steps) * meta_batch

        def ours() -> float:
            """Episodes/s once every worker delivered its first meta-batch (cache loads are not counted)."""
            for step, _ in meta_batches(ShardTasks(spec, "train", 0, root), steps, range(meta_batch), workers):
                if step == max(workers - 1, 0):
                    t1 = time.perf_counter()
            return (n - max(workers, 1) * meta_batch) / (time.perf_counter() - t1)

        source = ShardTasks(spec, "train", 0, root)
        store = source.store
        ids = np.repeat(np.array(sorted(store.offsets)), [store.counts[c] for c in sorted(store.offsets)])
        baseline = PerImagePipeline(store.images, ids)

        def base() -> float:
            count = max(n // 8, 4)
            t0 = time.perf_counter()
            for _ in range(count):
                baseline.sample(5, 5, 15)
            return count / (time.perf_counter() - t0)

        rounds = [(ours(), base()) for _ in range(repeats)]
        mine, theirs = max(r[0] for r in rounds), max(r[1] for r in rounds)
        batch = source.batch(0, range(1))
        step_s = maml_step_seconds(batch, ResNet12Spec(), inner_lr=0.01)
    return {
        "bench": "data-rgb",
        "episode": "5-way 5-shot 15-query RGB 84x84, crop+flip+jitter, normalised",
        "episodes_per_s": round(mine, 1),
        "baseline_episodes_per_s": round(theirs, 1),
        "ratio_vs_baseline": round(mine / theirs, 2),
        "resnet12_maml_meta_step_s_per_episode": round(step_s, 3),
        "ratio_vs_meta_step": round(mine * step_s, 1),
        "loader_workers": workers,
        "meta_batch": meta_batch,
        "episodes": n,
        "rounds": repeats,
        "all_rounds_episodes_per_s": [[round(a, 1), round(b, 1)] for a, b in rounds],
        "train_classes": classes,
        "pack_s": round(pack_s, 2),
        "stats": {
            k: [round(v, 4) for v in store_stats]
            for k, store_stats in source.pipeline.stats.items()
            if k in ("mean", "std")
        },
        "malloc_tuned": tuned,
    }
