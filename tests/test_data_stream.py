"""Streaming episodes (data/stream.py): pure in (seed, split, step, slot), memory bounded by the window, every class
of an epoch used, and the same clear errors as the whole-split cache."""

from __future__ import annotations

import gc
import hashlib
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from metascale.config import ShardsData, StreamSpec, parse_spec
from metascale.data import build_task_source
from metascale.data.episodes import ShardTasks
from metascale.data.index import load_index
from metascale.data.pack import SourceClass, pack
from metascale.data.store import ClassStore
from metascale.data.stream import StreamTasks, window_of
from metascale.data.tasks import held_out, online_stream
from metascale.errors import DataError, SpecError

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    """48 classes of 20 distinct 10x10 images (first pixel: class, second: instance), 3 classes per shard:
    train 8 shards, val 4, test 4."""
    out = tmp_path_factory.mktemp("set") / "shards"
    rng = np.random.default_rng(0)
    classes = []
    for c in range(48):
        imgs = rng.integers(0, 256, (20, 10, 10), dtype=np.uint8)
        imgs[:, 0, 0], imgs[:, 0, 1] = c, np.arange(20)
        classes.append(SourceClass(f"k{c}", f"a{c}", ("train", "val", "train", "test")[c % 4], list(imgs)))
    pack(classes, out, progress=False, max_classes_per_shard=3)
    return str(out)


def _spec(root, window_shards: int, window_steps: int, **kw) -> ShardsData:
    kw = {"ways": 3, "shots": 1, "queries": 2, **kw}
    kw.setdefault("normalize", False)  # tests read class and instance ids back from pixels
    return ShardsData(url=str(root), stream=StreamSpec(window_shards=window_shards, window_steps=window_steps), **kw)


def _digest(b) -> str:
    return hashlib.sha256(
        b"".join(t.numpy().tobytes() for t in (b.support_x, b.support_y, b.query_x, b.query_y))
    ).hexdigest()


def _classes(b) -> set[int]:
    return set(b.support_x[:, :, 0, 0, 0].mul(255).round().long().flatten().tolist())


def _window_classes(root: str, src: StreamTasks, step: int) -> set[int]:
    index = load_index(root)
    shards = window_of(src._loaded()[1], src.stream.window_shards, src.seed, src.split, step // src.stream.window_steps)
    return {i for i, c in enumerate(index.classes) if c.shard in shards}


def test_same_step_and_slot_give_the_same_bytes_in_any_order(shards):
    spec = _spec(shards, window_shards=2, window_steps=3, augment=["rot90"])
    a = build_task_source(spec, "train", 0)
    assert isinstance(a, StreamTasks)
    steps = [0, 4, 9, 20, 25]  # windows 0, 1, 3, 6, 8: across epochs (4 windows each)
    forward = {step: a.batch(step, range(6)) for step in steps}
    b = pickle.loads(pickle.dumps(build_task_source(spec, "train", 0)))  # as a Ray worker receives it
    for step in reversed(steps):
        for slot in (5, 2, 0):
            t = b.task(step, slot)
            assert _digest(t) == _digest(forward[step][slot])  # a slot is the same wherever it is computed
    assert _digest(a.batch(25, range(6))) == _digest(forward[25])  # and when asked again after other windows
    assert _digest(a.batch(1, [0])) != _digest(a.batch(0, [0]))  # steps of one window still differ
    assert _digest(build_task_source(spec, "train", 1).batch(0, [0])) != _digest(a.batch(0, [0]))
    # A window holding the whole split is the whole-split cache: the same bytes from either path.
    whole = _spec(shards, window_shards=8, window_steps=1, augment=["rot90"])
    cached = ShardTasks(whole, "train", 0, shards)
    for step in (0, 7):
        assert _digest(build_task_source(whole, "train", 0).batch_uint8(step, range(8))) == _digest(
            cached.batch_uint8(step, range(8))
        )


def test_decoded_shards_never_exceed_the_window(shards):
    src = build_task_source(_spec(shards, window_shards=3, window_steps=2), "train", 0)
    gc.collect()
    before = sum(type(o) is ClassStore for o in gc.get_objects())
    windows = set()
    for step in range(24):  # 12 windows, 3 per epoch (8 shards: the last window of an epoch wraps)
        b = src.batch(step, range(4))
        assert _classes(b) <= _window_classes(shards, src, step)
        windows.add(src.window(step).shards)
        assert len(src.cache.stores) <= 3 and set(src.cache.stores) == set(src.window(step).shards)
        gc.collect()
        assert sum(type(o) is ClassStore for o in gc.get_objects()) - before <= 3  # nothing else keeps one
    assert len(windows) >= 6 and src.cache.decodes > 8  # it streamed: shards were decoded again in later epochs


def test_one_epoch_of_windows_uses_every_class_of_the_split_and_no_other(shards):
    index = load_index(shards)
    for split, window_shards in (("train", 3), ("val", 2)):
        src = build_task_source(_spec(shards, window_shards=window_shards, window_steps=2), split, 0)
        n = len(src._loaded()[1])
        seen = set()
        for step in range(2 * -(-n // window_shards)):  # one epoch: ceil(shards / window) windows of 2 steps
            got = _classes(src.batch(step, range(8)))
            assert got <= _window_classes(shards, src, step)
            seen |= got
        assert seen == set(index.split_classes(split))
        assert {index.classes[c].split for c in seen} == {split}


def test_a_window_too_small_for_ways_is_a_clear_error(shards, tmp_path):
    with pytest.raises(
        DataError,
        match=r"data\.stream: a window of 1 shard\(s\) of split 'train' can hold as few as "
        r"3 usable classes \(train-0000\d\.tar\), fewer than ways=5",
    ):
        build_task_source(_spec(shards, window_shards=1, window_steps=5, ways=5), "train", 0).batch(0, [0])
    with pytest.raises(SpecError, match=r"data\.stream\.window_shards: Input should be greater than 0"):
        parse_spec({"data": {"source": "shards", "url": shards, "stream": {"window_shards": 0, "window_steps": 1}}})
    # Under on_bad_sample: skip, a window can lose a shard while reading: the error names the window's shards.
    root = tmp_path / "set"
    shutil.copytree(shards, root)
    src = build_task_source(_spec(root, window_shards=2, window_steps=1, ways=5, on_bad_sample="skip"), "train", 0)
    first = window_of(src._loaded()[1], 2, 0, "train", 0)
    (root / load_index(str(root)).shards[first[0]].name).write_bytes(b"not a tar")
    with pytest.raises(
        DataError,
        match=r"window 0 of split 'train' \(meta-steps from 0; shards train-\d+\.tar, "
        r"train-\d+\.tar\) has 3 usable classes, fewer than ways=5",
    ):
        src.batch(0, [0])
    assert src.stats.skipped_shards == 1


def test_a_corrupt_shard_in_a_window_raises_the_readers_error(shards, tmp_path):
    root = tmp_path / "set"
    shutil.copytree(shards, root)
    src = build_task_source(_spec(root, window_shards=2, window_steps=2), "train", 0)
    index = load_index(str(root))
    order = [window_of(src._loaded()[1], 2, 0, "train", w) for w in range(4)]  # epoch 0
    victim = order[2][0]
    path = Path(root) / index.shards[victim].name
    path.write_bytes(path.read_bytes()[:1500])
    for step in range(4):  # windows 0 and 1 never read the bad shard
        src.batch(step, range(4))
    with pytest.raises(DataError, match=rf"{index.shards[victim].name}.*(truncated|sha256)"):
        src.batch(4, [0])


def test_held_out_episodes_come_from_every_window_of_the_split(shards):
    """Evaluation draws episode `slot` in window slot % W of epoch 0, so a held-out set sees the whole split (not only
    window 0's classes), the same bytes every time, in the order asked, one window decoded at a time."""
    spec = _spec(shards, window_shards=2, window_steps=5)  # test split: 4 shards, so 2 windows
    src = build_task_source(spec, "test", 0)
    slots = [5, 0, 3, 2, 1, 4]
    b = held_out(src, slots)
    index = load_index(shards)
    test_classes = {i for i, c in enumerate(index.classes) if index.shards[c.shard].split == "test"}
    assert _classes(b) <= test_classes and not _classes(b) <= _window_classes(shards, src, 0)
    for i, slot in enumerate(slots):
        assert _digest(b[i]) == _digest(src.batch((slot % 2) * 5, [slot])[0])
        assert _classes(b[i : i + 1]) <= _window_classes(shards, src, (slot % 2) * 5)
    assert _digest(held_out(pickle.loads(pickle.dumps(src)), slots)) == _digest(b)
    assert len(src.cache.stores) <= 2
    whole = build_task_source(_spec(shards, window_shards=8, window_steps=5), "test", 0)
    assert _digest(held_out(whole, slots)) == _digest(ShardTasks(whole.spec, "test", 0, shards).batch(0, slots))


def test_the_online_stream_walks_the_shards_window_by_window(shards):
    """FTML's task t is episode (t, 0): tasks arrive from meta-step t's window, so the stream reads the shards in
    window order (not window 0 forever), the same bytes however the tasks are grouped."""
    spec = _spec(shards, window_shards=2, window_steps=3)  # train split: 8 shards, so 4 windows per epoch
    src = build_task_source(spec, "train", 0)
    tasks = [7, 0, 11, 4, 1, 9]
    b = online_stream(src, tasks)
    for i, t in enumerate(tasks):
        assert _digest(b[i : i + 1]) == _digest(src.batch(t, [0]))
        assert _classes(b[i : i + 1]) <= _window_classes(shards, src, t)
    windows = [frozenset(_window_classes(shards, src, t)) for t in tasks]
    assert len(set(windows)) == 4
    assert _digest(online_stream(pickle.loads(pickle.dumps(src)), tasks)) == _digest(b)
