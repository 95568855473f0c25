"""check_episodes: before any training, every split a job reads can make its episodes, from class counts alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from metascale.config import parse_spec
from metascale.data import check_episodes
from metascale.data.pack import SourceClass, pack
from metascale.errors import DataError


def _job(data: dict, eval_split: str = "test", model: str = "conv4"):
    return parse_spec({"name": "check", "model": {"name": model}, "data": data, "eval": {"split": eval_split}})


@pytest.fixture
def few_test_classes(tmp_path) -> str:
    """8 train, 5 val and 3 test classes of 4 instances; train class k7 has only 2."""
    rng = np.random.default_rng(0)
    splits = ["train"] * 8 + ["val"] * 5 + ["test"] * 3
    classes = [
        SourceClass(f"k{c}", f"k{c}", split, list(rng.integers(0, 256, (2 if c == 7 else 4, 6, 6), np.uint8)))
        for c, split in enumerate(splits)
    ]
    pack(classes, tmp_path / "set", progress=False, max_classes_per_shard=2)
    return str(tmp_path / "set")


def test_a_split_with_fewer_classes_than_ways_is_named(few_test_classes):
    shards = {"source": "shards", "url": few_test_classes, "ways": 5, "shots": 1, "queries": 1}
    with pytest.raises(DataError) as e:
        check_episodes(_job(shards))
    assert str(e.value) == f"data: split 'test' of {few_test_classes} has 3 classes, fewer than ways (5)"
    check_episodes(_job(shards, eval_split="val"))  # the job reads train and val only: both have 5 or more
    check_episodes(_job({**shards, "augment": ["rot90"]}))  # rotated copies are classes: 3 x 4 >= 5


def test_classes_short_of_shots_plus_queries(few_test_classes):
    shards = {"source": "shards", "url": few_test_classes, "ways": 3, "shots": 1, "queries": 2}
    with pytest.raises(
        DataError,
        match=rf"^data: {few_test_classes}: split 'train': class 7 'k7' \(shard "
        r"train-00003\.tar\) has 2 examples, fewer than shots\+queries=3",
    ):
        check_episodes(_job(shards))
    check_episodes(_job({**shards, "on_bad_sample": "skip"}))  # k7 left out: 7 train classes remain
    with pytest.raises(DataError) as e:
        check_episodes(_job({**shards, "ways": 8, "on_bad_sample": "skip"}, eval_split="val"))
    assert str(e.value) == (
        f"data: split 'train' of {few_test_classes} has 8 classes, 7 of them with "
        f"shots+queries=3 examples (on_bad_sample: skip), fewer than ways (8)"
    )


def test_a_good_set_passes_reading_the_index_alone(few_test_classes):
    for shard in Path(few_test_classes).glob("*.tar"):
        shard.unlink()  # a check that opened a shard would now fail
    check_episodes(_job({"source": "shards", "url": few_test_classes, "ways": 3, "shots": 1, "queries": 1}))


def test_stream_windows_are_checked_too(few_test_classes):
    data = {
        "source": "shards",
        "url": few_test_classes,
        "ways": 3,
        "shots": 1,
        "queries": 1,
        "stream": {"window_shards": 1, "window_steps": 10},
    }
    with pytest.raises(
        DataError,
        match=r"^data\.stream: a window of 1 shard\(s\) of split 'train' can hold as few "
        r"as 2 usable classes",
    ):
        check_episodes(_job(data))


def test_a_glyph_set_too_small_for_a_test_split(tmp_path):
    """30 glyphs are one alphabet, and whole alphabets go to a split: nothing is left for 'test'."""
    glyphs = {"source": "glyphs", "root": str(tmp_path), "classes": 30, "instances": 2, "shots": 1, "queries": 1}
    with pytest.raises(
        DataError,
        match=r"^data: split 'test' of .*/glyphs-v2-28px-30c-2i-s0 has 0 classes, fewer "
        r"than ways \(5\)$",
    ):
        check_episodes(_job(glyphs))


def test_synthetic_images_split_their_classes_64_16_20():
    check_episodes(_job({"source": "synthetic", "classes": 25, "ways": 5}))  # train 16, val 4, test 5
    with pytest.raises(DataError) as e:
        check_episodes(_job({"source": "synthetic", "classes": 16, "ways": 5}))  # train 10, val 2, test 4
    assert str(e.value) == "data: split 'test' has 4 classes (of data.classes=16), fewer than ways (5)"
    with pytest.raises(DataError, match=r"^data: split 'val' has 4 classes"):
        check_episodes(_job({"source": "synthetic", "classes": 25, "ways": 5}, eval_split="val"))


def test_sources_with_nothing_to_check():
    check_episodes(_job({"source": "sinusoid"}, model="mlp"))
    spec = parse_spec(
        {"model": {"name": "conv4"}, "data": {"source": "noisy_labels", "ways": 3}, "algorithm": {"name": "mwn"}}
    )
    check_episodes(spec)
