"""Per-sample WebDataset sets (data.layout: samples): written by webdataset's own ShardWriter, read without packing,
episodes pure in (seed, split, step, slot) across readers and index reloads, stale indexes rebuilt, byte-range reads
over HTTP, and one-line errors for malformed sets."""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from metascale.config import ShardsData
from metascale.data import build_task_source, check_episodes
from metascale.data import samples as samples_mod
from metascale.errors import DataError

CLASSES = {"train": range(0, 8), "val": range(8, 12)}


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def write_set(root, per_class=6, size=12, seed=0) -> dict[bytes, int]:
    """A per-sample set in webdataset's layout, classes interleaved across shards; returns image pixels -> class."""
    import webdataset as wds

    rng = np.random.default_rng(seed)
    truth = {}
    for split, classes in CLASSES.items():
        with wds.ShardWriter(str(root / f"{split}-%06d.tar"), maxcount=20, verbose=0) as w:
            for n in range(per_class):
                for c in classes:
                    a = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                    truth[a.transpose(2, 0, 1).tobytes()] = c
                    w.write({"__key__": f"{split}/{n:03d}_{c:03d}", "png": _png(a), "cls": str(c).encode()})
    return truth


def spec(url, **kw) -> ShardsData:
    return ShardsData(url=str(url), layout="samples", **{"ways": 3, "shots": 2, "queries": 3, **kw})


def _check_episode(source, truth, step, slot):
    b = source.batch_uint8(step, [slot])
    index, plan = source.index, source.planner.plan(step, slot, 3, 5)
    for x, y in ((b.support_x[0], b.support_y[0]), (b.query_x[0], b.query_y[0])):
        for img, label in zip(x, y):
            assert truth[img.numpy().tobytes()] == index.labels[plan[int(label)].class_id]
    seen = [img.numpy().tobytes() for img in torch.cat([b.support_x[0], b.query_x[0]])]
    assert len(set(seen)) == len(seen)  # support and query disjoint, no example twice


def test_episodes_come_from_a_webdataset_set_without_packing(tmp_path):
    truth = write_set(tmp_path)
    assert len(list(tmp_path.glob("train-*.tar"))) > 1
    source = build_task_source(spec(tmp_path), "train", seed=0)
    for step in range(5):
        _check_episode(source, truth, step, slot=step % 2)
    assert (tmp_path / "metascale-index.json").exists()
    val = build_task_source(spec(tmp_path), "val", seed=0)
    assert {val.index.labels[p.class_id] for p in val.planner.plan(0, 0, 3, 5)} <= set(CLASSES["val"])


def test_episodes_are_pure_across_readers_and_after_an_index_reload(tmp_path, monkeypatch):
    write_set(tmp_path)
    first = build_task_source(spec(tmp_path), "train", seed=7).batch(3, [0, 1, 2])
    other_seed = build_task_source(spec(tmp_path), "train", seed=8).batch(3, [0, 1, 2])
    assert not torch.equal(first.support_x, other_seed.support_x)

    def no_rebuild(*a):
        raise AssertionError("index rebuilt although no shard changed")

    monkeypatch.setattr(samples_mod, "build_index", no_rebuild)
    again = build_task_source(spec(tmp_path), "train", seed=7)
    assert torch.equal(again.batch(3, [0, 1, 2]).query_x, first.query_x)
    assert torch.equal(again.batch(3, [2]).support_x[0], first.support_x[2])  # a slot alone = the slot in a batch


def test_a_changed_shard_rebuilds_the_index(tmp_path):
    truth = write_set(tmp_path)
    source = build_task_source(spec(tmp_path), "train", seed=0)
    before = source.index
    shard = sorted(tmp_path.glob("train-*.tar"))[0]
    (tmp_path / "x").mkdir()
    extra = write_set(tmp_path / "x", per_class=5, seed=1)
    os.replace(sorted((tmp_path / "x").glob("train-*.tar"))[0], shard)  # a different shard under the same name
    after = build_task_source(spec(tmp_path), "train", seed=0)
    assert after.index.shards[0]["stamp"] != before.shards[0]["stamp"]
    _check_episode(after, {**truth, **extra}, step=0, slot=0)


def test_byte_range_reads_over_http(tmp_path, http_server):
    truth = write_set(tmp_path)
    names = sorted(p.name for p in tmp_path.glob("*.tar"))
    url = http_server(tmp_path)
    n_train = sum(n.startswith("train") for n in names)
    splits = {"train": f"train-{{000000..{n_train - 1:06d}}}.tar", "val": "val-000000.tar"}
    index_file = tmp_path / "cache" / "remote-index.json"
    source = build_task_source(spec(url, splits=splits, index=str(index_file)), "train", seed=0)
    _check_episode(source, truth, step=1, slot=0)
    local = build_task_source(spec(tmp_path), "train", seed=0)
    assert torch.equal(source.batch(1, [0, 1]).query_x, local.batch(1, [0, 1]).query_x)
    assert index_file.exists()


def _tar(path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


IMG = _png(np.zeros((8, 8, 3), np.uint8))


@pytest.mark.parametrize(
    "members, message",
    [
        ({"a.png": IMG, "a.cls": b"0", "b.png": IMG}, "sample b: no .cls member"),
        ({"a.png": IMG, "a.cls": b"cat"}, "sample a: .cls is 'cat', not an integer class"),
        ({"a.png": b"not an image", "a.cls": b"1"}, "sample a: .png is not a readable image"),
        ({"a.cls": b"1", "a.txt": b"x"}, "sample a: no image member"),
        (
            {"a.png": IMG, "a.cls": b"1", "b.png": _png(np.zeros((9, 8), np.uint8)), "b.cls": b"1"},
            "images differ in size",
        ),
    ],
    ids=["missing-cls", "non-integer-cls", "unreadable-image", "no-image", "mixed-sizes"],
)
def test_malformed_sets_are_one_line_errors(tmp_path, members, message):
    _tar(tmp_path / "train-000000.tar", members)
    with pytest.raises(DataError, match=message) as e:
        build_task_source(spec(tmp_path), "train", seed=0).batch(0, [0])
    assert "\n" not in str(e.value) and "train-000000.tar" in str(e.value)


def test_a_class_in_two_splits_and_a_short_class_are_errors(tmp_path, make_job):
    _tar(tmp_path / "train-000000.tar", {"a.png": IMG, "a.cls": b"3"})
    _tar(tmp_path / "val-000000.tar", {"b.png": IMG, "b.cls": b"3"})
    with pytest.raises(DataError, match="class 3 is in split 'val' and in split 'train'"):
        build_task_source(spec(tmp_path), "train", seed=0).batch(0, [0])
    (tmp_path / "val-000000.tar").unlink()
    (tmp_path / "short").mkdir()
    write_set(tmp_path / "short", per_class=4)
    job = make_job(tmp_path / "job", data=spec(tmp_path / "short").model_dump())
    with pytest.raises(
        DataError,
        match=r"class 0 '0' \(shard train-000000.tar\) has 4 examples, fewer than "
        r"shots\+queries=5",
    ):
        check_episodes(job)


def test_spec_keeps_layout_fields_to_their_layout():
    with pytest.raises(ValueError, match="splits: only for layout 'samples'"):
        ShardsData(url="x", splits={"train": "t-*.tar"})
    with pytest.raises(ValueError, match="stream: only for layout 'classes'"):
        ShardsData(url="x", layout="samples", stream={"window_shards": 1, "window_steps": 1})
    with pytest.raises(ValueError, match="pipe: url"):
        ShardsData(url="pipe:cat {name}", layout="samples")
