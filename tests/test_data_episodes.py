"""Episodes from task shards: shapes and labels, purity in (seed, split, step, slot), shard partitioning."""

from __future__ import annotations

import hashlib
import itertools
import subprocess
import sys

import numpy as np
import pytest
import torch

from metascale.config import ShardsData
from metascale.data import build_task_source
from metascale.data.episodes import ShardTasks
from metascale.data.index import load_index
from metascale.data.loader import meta_batches
from metascale.data.pack import SourceClass, pack
from metascale.data.reader import shard_stream
from metascale.data.store import load_store


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    """40 classes of 20 distinct 10x10 images; each image's first pixel encodes its class, the second its instance."""
    out = tmp_path_factory.mktemp("set") / "shards"
    rng = np.random.default_rng(0)
    classes = []
    for c in range(40):
        imgs = rng.integers(0, 256, (20, 10, 10), dtype=np.uint8)
        imgs[:, 0, 0], imgs[:, 0, 1] = c, np.arange(20)
        classes.append(SourceClass(f"k{c}", f"a{c // 4}", ("train", "train", "val", "test")[c % 4], list(imgs)))
    pack(classes, out, progress=False, max_classes_per_shard=3)
    return str(out)


def _digest(b) -> str:
    return hashlib.sha256(
        b"".join(t.numpy().tobytes() for t in (b.support_x, b.support_y, b.query_x, b.query_y))
    ).hexdigest()


def test_batch_shapes_labels_and_pixels(shards):
    src = build_task_source(ShardsData(url=shards, ways=5, shots=2, queries=3, normalize=False), "train", seed=1)
    b = src.batch(7, range(4))
    assert b.support_x.shape == (4, 10, 1, 10, 10) and b.query_x.shape == (4, 15, 1, 10, 10)
    assert b.support_x.dtype == torch.float32 and 0 <= b.support_x.min() and b.support_x.max() <= 1
    assert b.support_y[0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]  # class-major, episode-local labels
    index = load_index(shards)
    for t in b.tasks():
        raw = torch.cat([t.support_x, t.query_x])[:, 0, 0, :2].mul(255).round().long()
        labels = torch.cat([t.support_y, t.query_y])
        for lab in range(5):  # every image of an episode label comes from one train class, never twice
            cls, inst = raw[labels == lab].T
            assert len(set(cls.tolist())) == 1 and len(set(inst.tolist())) == 5
            assert index.classes[int(cls[0])].split == "train"
        assert len(set(raw[:, 0].tolist())) == 5


def test_pure_in_seed_split_step_slot(shards):
    spec = ShardsData(url=shards, ways=3, shots=1, queries=2)
    a, b = ShardTasks(spec, "train", 0, shards), ShardTasks(spec, "train", 0, shards)
    whole = a.batch(11, [0, 1, 2, 3])
    assert _digest(whole) == _digest(b.batch(11, [0, 1, 2, 3]))
    assert torch.equal(whole[2].query_x, b.task(11, 2).query_x)  # a slot is the same wherever it is computed
    assert _digest(a.batch(12, [0])) != _digest(a.batch(11, [0]))
    assert _digest(ShardTasks(spec, "train", 1, shards).batch(11, [0])) != _digest(a.batch(11, [0]))
    code = (
        f"import hashlib; from metascale.config import ShardsData; from metascale.data.episodes import ShardTasks; "
        f"b = ShardTasks(ShardsData(url={shards!r}, ways=3, shots=1, queries=2), 'train', 0, {shards!r}).batch(11, [0, 1, 2, 3]); "
        f"print(hashlib.sha256(b''.join(t.numpy().tobytes() for t in (b.support_x, b.support_y, b.query_x, b.query_y))).hexdigest())"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other.stdout.strip() == _digest(whole)


def test_splits_never_mix(shards):
    index = load_index(shards)
    seen = {}
    for split in ("train", "val", "test"):
        src = ShardTasks(ShardsData(url=shards, ways=2, shots=1, queries=1, normalize=False), split, 0, shards)
        b = src.batch(0, range(20))
        seen[split] = set(b.support_x[:, :, 0, 0, 0].mul(255).round().long().flatten().tolist())
        assert {index.classes[c].split for c in seen[split]} == {split}
    assert not (seen["train"] & seen["val"]) and not (seen["train"] & seen["test"]) and not (seen["val"] & seen["test"])


def test_rot90_makes_rotated_copies_new_classes(shards):
    src = ShardTasks(
        ShardsData(url=shards, ways=5, shots=1, queries=1, augment=["rot90"], normalize=False), "train", 0, shards
    )
    assert len(src.planner.virtual) == 4 * 20
    turns = set()
    for step in range(10):
        plan = src.planner.plan(step, 0, 5, 2)
        t = src.task(step, 0)
        for label, p in enumerate(plan):
            original = src.store.images[src.store.rows(p.class_id, p.instances[:1])][0, 0]
            got = t.support_x[label, 0].mul(255).round().to(torch.uint8).numpy()
            np.testing.assert_array_equal(got, np.rot90(original, p.quarter_turns))
            turns.add(p.quarter_turns)
    assert turns == {0, 1, 2, 3}


def test_rank_and_worker_splits_partition_the_shards(shards):
    names = [s.name for s in load_index(shards).shards]
    for world, workers in itertools.product((1, 2, 3), (1, 2, 4)):
        got = [
            item["url"].rsplit("/", 1)[1]
            for r in range(world)
            for w in range(workers)
            for item in shard_stream(shards, names, r, world, w, workers)
        ]
        assert sorted(got) == sorted(names)  # none duplicated, none dropped


def test_parallel_cache_load_and_loader_workers_agree(shards):
    index = load_index(shards)
    one, two = load_store(index, shards, "train"), load_store(index, shards, "train", workers=2)
    np.testing.assert_array_equal(one.images, two.images)
    src = ShardTasks(ShardsData(url=shards, ways=4, shots=1, queries=2), "train", 3, shards)
    got = []
    for step, b in meta_batches(src, range(30), range(3), workers=2):  # 15 items a worker: its ring is reused
        assert _digest(b) == _digest(src.batch(step, range(3)))
        got.append(step)
    assert got == list(range(30))


def test_pipe_fsspec_and_http_sources_read_the_same_episodes(shards, http_server):
    spec = ShardsData(url=shards, ways=3, shots=1, queries=2)
    local = ShardTasks(spec, "train", 0, shards).batch(4, range(3))
    shell = f"pipe:sh -c 'cat \"$1\"' sh {shards}/{{name}}"  # a template that needs a shell passes the name as $1
    for root in (f"pipe:cat {shards}/{{name}}", shell, f"file://{shards}", http_server(shards)):
        assert _digest(ShardTasks(spec, "train", 0, root).batch(4, range(3))) == _digest(local)
