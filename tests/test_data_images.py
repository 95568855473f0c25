"""The image pipeline: pack-time normalisation stats, normalised reading, and train-time augmentation that is pure
in (seed, split, step, slot, example) wherever and whenever it is computed."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from metascale.config import AugmentSpec, ShardsData, parse_spec
from metascale.data.episodes import ShardTasks
from metascale.data.images import DRAWS, augment_images, crop_boxes
from metascale.data.index import INDEX_NAME, load_index
from metascale.data.loader import meta_batches
from metascale.data.pack import SourceClass, pack
from metascale.errors import SpecError

AUG = {"crop": {"scale": [0.3, 1.0]}, "flip": True, "jitter": {}}


@pytest.fixture(scope="module")
def rgb(tmp_path_factory) -> tuple[str, dict[str, np.ndarray]]:
    """A tiny RGB set, 12x12 (not square-friendly sizes are the crop's business): 8 train, 4 val, 4 test classes of
    6 images; train pixels are biased per channel so the stats are not all alike. Returns (root, split -> images)."""
    out = tmp_path_factory.mktemp("rgb") / "set"
    rng = np.random.default_rng(0)
    classes, by_split = [], {"train": [], "val": [], "test": []}
    for c, split in enumerate(["train"] * 8 + ["val"] * 4 + ["test"] * 4):
        imgs = rng.integers(0, 256, (6, 12, 12, 3), dtype=np.uint8)
        if split == "train":
            imgs = (imgs * np.array([0.3, 0.6, 1.0])).astype(np.uint8)
        classes.append(SourceClass(f"k{c}", f"k{c}", split, list(imgs)))
        by_split[split].append(imgs)
    pack(classes, out, progress=False, max_classes_per_shard=3)
    return str(out), {s: np.concatenate(v) for s, v in by_split.items()}


def _spec(root: str, **kw) -> ShardsData:
    return ShardsData(url=root, **{"ways": 3, "shots": 2, "queries": 2, "augment": AUG, "normalize": True, **kw})


def test_pack_stats_are_numpys_mean_and_std_over_the_train_split(rgb):
    root, images = rgb
    stats = load_index(root).stats
    train = images["train"].astype(np.float64) / 255
    np.testing.assert_allclose(stats["mean"], train.mean(axis=(0, 1, 2)), rtol=1e-12)
    np.testing.assert_allclose(stats["std"], train.std(axis=(0, 1, 2)), rtol=1e-9)
    assert stats["images"] == len(images["train"])
    everything = np.concatenate(list(images.values())).astype(np.float64) / 255
    assert not np.allclose(stats["mean"], everything.mean(axis=(0, 1, 2)), atol=1e-3)  # val/test not counted


def test_reading_normalises_with_the_stats_and_old_sets_stay_in_unit_range(rgb, tmp_path):
    root, _ = rgb
    stats = load_index(root).stats
    plain = ShardTasks(_spec(root, augment=[], normalize=False), "val", 0, root).batch(3, [0, 1])
    normed = ShardTasks(_spec(root, augment=[]), "val", 0, root).batch(3, [0, 1])
    mean, std = (torch.tensor(stats[k], dtype=torch.float32).view(3, 1, 1) for k in ("mean", "std"))
    torch.testing.assert_close(normed.query_x, (plain.query_x - mean) / std)
    assert 0 <= plain.query_x.min() and plain.query_x.max() <= 1
    old = tmp_path / "old"  # a set packed before stats existed: its index has no "stats"
    shutil.copytree(root, old)
    doc = json.loads((old / INDEX_NAME).read_text())
    del doc["stats"]
    (old / INDEX_NAME).write_text(json.dumps(doc))
    assert load_index(str(old)).stats is None
    legacy = ShardTasks(_spec(str(old), augment=[]), "val", 0, str(old)).batch(3, [0, 1])
    torch.testing.assert_close(legacy.query_x, plain.query_x)


def test_same_seed_step_slot_gives_identical_augmented_episodes_from_two_loaders_and_after_resume(rgb):
    root, _ = rgb
    spec = _spec(root)
    one = dict(meta_batches(ShardTasks(spec, "train", 5, root), range(8), range(3), workers=2))
    two = dict(meta_batches(ShardTasks(spec, "train", 5, root), range(8), range(3), workers=2))
    resumed = dict(meta_batches(ShardTasks(spec, "train", 5, root), range(5, 8), range(3), workers=2))  # from step 5
    for step in range(8):
        assert torch.equal(one[step].support_x, two[step].support_x) and torch.equal(
            one[step].query_x, two[step].query_x
        )
    for step in range(5, 8):
        assert torch.equal(one[step].query_x, resumed[step].query_x)
    redispatched = ShardTasks(spec, "train", 5, root).batch(6, [2])  # slot 2 alone, in this process
    assert torch.equal(redispatched.support_x[0], one[6].support_x[2])


def test_augmentation_changes_train_episodes_per_slot_and_leaves_eval_splits_alone(rgb):
    root, _ = rgb
    aug, plain = ShardTasks(_spec(root), "train", 0, root), ShardTasks(_spec(root, augment=[]), "train", 0, root)
    a, p = aug.episodes_uint8(2, [0, 1]), plain.episodes_uint8(2, [0, 1])
    assert torch.equal(a.support_y, p.support_y) and not torch.equal(a.support_x, p.support_x)
    # The same images in two slots get different draws: slot 1's episode recomputed with slot 0's key differs.
    again = aug.pipeline.augment(p, 2, [1, 0])
    assert not torch.equal(again.support_x[0], a.support_x[0]) and not torch.equal(again.support_x[1], a.support_x[1])
    for split in ("val", "test"):
        e = ShardTasks(_spec(root), split, 0, root).batch(2, [0, 1])
        f = ShardTasks(_spec(root, augment=[]), split, 0, root).batch(2, [0, 1])
        assert torch.equal(e.support_x, f.support_x) and torch.equal(e.query_x, f.query_x)


@pytest.mark.parametrize("shape", [(20, 3, 84, 84), (4, 3, 224, 224), (10, 1, 28, 28)])
def test_augmentations_keep_shape_dtype_and_range(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
    u = torch.rand(shape[0], DRAWS, dtype=torch.float64, generator=g)
    for spec in (AugmentSpec(**AUG), AugmentSpec(crop=True), AugmentSpec(flip=True), AugmentSpec(jitter=True)):
        y = augment_images(x, u, spec)
        assert y.shape == x.shape and y.dtype == torch.uint8
    flip_all = torch.zeros(shape[0], DRAWS, dtype=torch.float64)  # u[:, 4] < 0.5: every image flipped
    assert torch.equal(augment_images(x, flip_all, AugmentSpec(flip=True)), x.flip(-1))
    full = AugmentSpec(crop={"scale": [1.0, 1.0], "ratio": [1.0, 1.0]})  # the whole image, resampled onto itself
    assert torch.equal(augment_images(x, torch.full((shape[0], DRAWS), 0.9, dtype=torch.float64), full), x)
    unit = AugmentSpec(jitter={"brightness": 0, "contrast": 0, "saturation": 0})
    assert torch.equal(augment_images(x, u, unit), x)


@pytest.mark.parametrize(
    ("augment", "message"),
    [
        (["rot90", "zoom"], "data.augment: unknown augmentation 'zoom' (expected some of rot90, crop, flip, jitter)"),
        ({"crop": {"scale": [0.5, 2]}}, "data.augment.crop.scale: crop.scale must be (low, high) with 0 < low <= high"),
        ({"crop": {"ratio": [2, 1]}}, "data.augment.crop.ratio: crop.ratio must be (low, high) with 0 < low <= high"),
        ({"jitter": {"brightness": 1.5}}, "data.augment.jitter.brightness:"),
        ({"flip": "sometimes"}, "data.augment.flip:"),
    ],
)
def test_bad_augmentation_settings_are_one_problem_line_each(augment, message):
    with pytest.raises(SpecError) as e:
        parse_spec({"data": {"source": "shards", "url": "x", "augment": augment}})
    assert len(e.value.problems) == 1 and message in e.value.problems[0], e.value.problems


def test_rot90_list_form_still_works_and_synthetic_refuses_augmentation():
    spec = parse_spec({"model": {"name": "conv4"}, "data": {"source": "glyphs", "augment": ["rot90"]}})
    assert spec.data.augment.rot90 and not spec.data.augment.per_example
    with pytest.raises(SpecError, match="augment applies to packed sets"):
        parse_spec({"model": {"name": "conv4"}, "data": {"source": "synthetic", "augment": ["flip"]}})


def test_crop_is_pils_bilinear_resize_of_the_drawn_integer_box_and_boxes_follow_their_draws():
    g = torch.Generator().manual_seed(1)
    n, h, w = 40, 84, 76
    x = torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=g)
    u = torch.rand(n, DRAWS, dtype=torch.float64, generator=g)
    u[0, 2:4], u[1, 2:4] = 0.0, 1 - 1e-12  # the box at the top-left corner, then at the bottom-right one
    spec = AugmentSpec(crop={"scale": [0.2, 0.9]})
    boxes = crop_boxes(u, h, w, spec.crop)
    top, left, bh, bw = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + bh <= h).all() and (left + bw <= w).all()
    assert boxes[0, :2].tolist() == [0, 0] and boxes[1, :2].tolist() == [h - bh[1], w - bw[1]]
    area = 0.2 + u[:, 0] * 0.7  # the drawn fraction; sides are rounded to pixels, so compare to one pixel's worth
    np.testing.assert_allclose((bh * bw).double() / (h * w), area, atol=(h + w + 1) / (h * w))
    ratio = np.exp(np.log(3 / 4) + u[:, 1].numpy() * np.log(16 / 9))
    np.testing.assert_allclose(bw.numpy() / bh.numpy(), ratio, rtol=0.05)
    y = augment_images(x, u, spec)
    for k, (t, lf, hh, ww) in enumerate(boxes.tolist()):
        im = Image.fromarray(x[k].permute(1, 2, 0).numpy())
        ref = np.asarray(im.crop((lf, t, lf + ww, t + hh)).resize((w, h), Image.Resampling.BILINEAR))  # torchvision PIL
        diff = np.abs(y[k].permute(1, 2, 0).numpy().astype(int) - ref.astype(int))
        assert diff.max() <= 1, (k, diff.max())


def test_flip_and_jitter_follow_their_draws():
    g = torch.Generator().manual_seed(2)
    n = 24
    x = torch.randint(0, 256, (n, 3, 20, 20), dtype=torch.uint8, generator=g)
    u = torch.rand(n, DRAWS, dtype=torch.float64, generator=g)
    flip = u[:, 4] < 0.5
    assert 0 < flip.sum() < n
    y = augment_images(x, u, AugmentSpec(flip=True, crop={"scale": [1, 1], "ratio": [1, 1]}))
    assert torch.equal(y[flip], x[flip].flip(-1)) and torch.equal(y[~flip], x[~flip])
    j = {"brightness": 0.4, "contrast": 0.3, "saturation": 0.5}
    y = augment_images(x, u, AugmentSpec(jitter=j))
    # torchvision's formulas in float64 with the factors each draw gives, rounded once.
    b, c, s = (((1 - v) + u[:, col] * 2 * v).view(n, 1, 1, 1) for col, v in ((5, 0.4), (6, 0.3), (7, 0.5)))
    w = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64).view(1, 3, 1, 1)
    f = (x.double() / 255 * b).clamp(0, 1)
    f = (c * f + (1 - c) * (f * w).sum(1, keepdim=True).mean(dim=(1, 2, 3), keepdim=True)).clamp(0, 1)
    f = (s * f + (1 - s) * (f * w).sum(1, keepdim=True)).clamp(0, 1)
    assert (y.double() - (f * 255).round()).abs().max() <= 1
