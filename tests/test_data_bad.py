"""Bad task data: each case is a DataError naming the shard and sample, or a counted skip; never a hang."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from metascale.config import ShardsData
from metascale.data.episodes import ShardTasks
from metascale.data.index import load_index
from metascale.data.pack import SourceClass, encode_png, pack
from metascale.data.urls import join, read_bytes
from metascale.errors import DataError

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def packed(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    classes = [
        SourceClass(f"k{c}", f"k{c}", "train", list(rng.integers(0, 256, (8, 6, 6), dtype=np.uint8))) for c in range(12)
    ]
    pack(classes, tmp_path / "set", progress=False, max_classes_per_shard=4)
    return tmp_path / "set"


def _source(root: Path | str, on_bad: str = "error", shots: int = 2, queries: int = 2) -> ShardTasks:
    return ShardTasks(ShardsData(url=str(root), ways=3, shots=shots, queries=queries), "train", 0, str(root), on_bad)


def _rewrite_shard(root: Path, shard: str, edit) -> None:
    """Rewrites a shard's samples through `edit(sample) -> sample | None` and re-signs the index, so only the
    sample-level check can catch the problem."""
    path = root / shard
    samples = list(wds.WebDataset(str(path), shardshuffle=False, empty_check=False))
    with wds.TarWriter(str(path)) as w:
        for s in samples:
            s = edit({k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"})
            if s is not None:
                w.write(s)
    doc = json.loads((root / "index.json").read_text())
    for e in doc["shards"]:
        if e["name"] == shard:
            e["sha256"], e["bytes"] = hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_size
    (root / "index.json").write_text(json.dumps(doc))


def test_truncated_tar_names_the_shard_or_is_skipped(packed):
    path = packed / "train-00001.tar"
    path.write_bytes(path.read_bytes()[:1500])
    with pytest.raises(DataError, match=r"train-00001\.tar.*(truncated|sha256)"):
        _source(packed).batch(0, [0])
    src = _source(packed, "skip")
    src.batch(0, range(8))
    assert src.store.stats.skipped_shards == 1 and src.store.stats.skipped_samples == 32
    assert len(src.planner.virtual) == 8  # the 4 classes of the bad shard are out, the rest serve episodes


def test_corrupted_bytes_fail_the_checksum(packed):
    path = packed / "train-00000.tar"
    data = bytearray(path.read_bytes())
    data[700] ^= 0xFF  # inside the first PNG: the tar still parses
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"train-00000\.tar.*(sha256|decode)"):
        _source(packed).batch(0, [0])


def test_sample_missing_a_field(packed):
    _rewrite_shard(
        packed,
        "train-00002.tar",
        lambda s: {k: v for k, v in s.items() if k != "json"} if s["__key__"] == "c000009" else s,
    )
    with pytest.raises(DataError, match=r"train-00002\.tar sample c000009: missing field \['json'\]"):
        _source(packed).batch(0, [0])
    src = _source(packed, "skip")
    src.batch(0, [0])
    assert src.store.stats.skipped_samples == 8 and 9 not in src.store.offsets


def test_image_that_does_not_decode(packed):
    _rewrite_shard(
        packed, "train-00000.tar", lambda s: {**s, "png": b"\x89PNG not really"} if s["__key__"] == "c000002" else s
    )
    with pytest.raises(DataError, match=r"train-00000\.tar sample c000002: image does not decode"):
        _source(packed).batch(0, [0])


def test_image_of_the_wrong_shape_is_not_silently_used(packed):
    _rewrite_shard(
        packed,
        "train-00000.tar",
        lambda s: {**s, "png": encode_png(np.zeros((7 * 6, 6), np.uint8))} if s["__key__"] == "c000001" else s,
    )
    with pytest.raises(DataError, match=r"sample c000001: image is 6x42, expected 6x48"):
        _source(packed).batch(0, [0])


def test_class_missing_from_its_shard(packed):
    _rewrite_shard(packed, "train-00000.tar", lambda s: None if s["__key__"] == "c000003" else s)
    with pytest.raises(DataError, match=r"train-00000\.tar: class 3 'k3' is in the index but not in the shard"):
        _source(packed).batch(0, [0])


def test_class_with_fewer_than_shots_plus_queries(tmp_path):
    rng = np.random.default_rng(1)
    classes = [
        SourceClass(f"k{c}", "a", "train", list(rng.integers(0, 256, (3 if c == 2 else 6, 5, 5), dtype=np.uint8)))
        for c in range(5)
    ]
    pack(classes, tmp_path / "s", progress=False)
    with pytest.raises(
        DataError, match=r"class 2 'k2' \(shard train-00000\.tar\) has 3 examples, fewer than shots\+queries=4"
    ):
        _source(tmp_path / "s").batch(0, [0])
    src = _source(tmp_path / "s", "skip")
    b = src.batch(0, range(10))
    assert src.planner.skipped_classes == 1 and b.support_x.shape[1] == 6


def test_index_that_does_not_match_its_shards(packed):
    doc = json.loads((packed / "index.json").read_text())
    doc["shards"][0]["sha256"] = "0" * 64
    (packed / "index.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"train-00000\.tar: sha256 .* does not match the index"):
        _source(packed).batch(0, [0])


def test_missing_shard_and_foreign_index(packed, tmp_path):
    (packed / "train-00002.tar").unlink()
    with pytest.raises(DataError, match=r"train-00002\.tar: cannot be opened"):
        _source(packed).batch(0, [0])
    other = tmp_path / "other"
    other.mkdir()
    (other / "index.json").write_text('{"format": "something-else"}')
    with pytest.raises(DataError, match="not a metascale task-shard index"):
        load_index(str(other))
    shutil.rmtree(other)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "index.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_index(str(tmp_path / "other"))


def test_errors_in_loader_workers_keep_their_message_without_the_workers_traceback(packed):
    """The DataLoader puts a worker's whole traceback into the exception's message; the user gets ours alone."""
    path = packed / "train-00001.tar"
    path.write_bytes(path.read_bytes()[:1500])
    src = ShardTasks(ShardsData(url=str(packed), ways=3, shots=2, queries=2), "train", 0, str(packed), load_workers=2)
    with pytest.raises(DataError, match=r"^[^\n]*train-00001\.tar") as e:
        src.batch(0, [0])
    assert "Traceback" not in str(e.value) and "DataLoader worker" not in str(e.value)


def test_missing_shard_on_a_remote_root_is_the_same_clear_error(packed, http_server):
    """A 404 from an object store's HTTP endpoint reads as the local case does, not as a client library's trace."""
    root = http_server(packed)
    _source(root).batch(0, [0])  # the served set reads: the error below is the missing shard, not the server
    (packed / "train-00001.tar").unlink()
    with pytest.raises(DataError, match=r"train-00001\.tar: cannot be opened"):
        _source(root).batch(0, [0])


def test_a_shard_name_from_the_index_never_reaches_a_shell(packed, tmp_path):
    marker = tmp_path / "pwned"
    doc = json.loads((packed / "index.json").read_text())
    doc["shards"][0]["name"] = f"train-00000.tar; touch {marker}"
    (packed / "index.json").write_text(json.dumps(doc))
    root = f"pipe:cat {packed}/{{name}}"
    with pytest.raises(
        DataError,
        match=rf"^pipe:cat {packed}/index\.json: shard 0 is named 'train-00000\.tar; touch "
        rf".*pwned', not a plain file name",
    ):
        _source(root).batch(0, [0])
    assert not marker.exists()
    with pytest.raises(DataError, match="not a plain file name"):
        _source(packed).batch(0, [0])  # the same index read locally: '/' or '..' would leave the set's folder


def test_pipe_commands_run_from_an_argument_vector_without_a_shell(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where a shell would have run `touch pwned`
    marker = tmp_path / "pwned"
    odd = tmp_path / "a b; touch pwned $(id).tar"  # were it pasted into a shell, this would run touch
    odd.write_bytes(b"shard bytes")
    root = f"pipe:cat {tmp_path}/{{name}}"
    assert read_bytes(join(root, odd.name)) == b"shard bytes"
    with pytest.raises(OSError, match="'cat' exited with status 1"):
        read_bytes(join(root, f"x; touch {marker}"))
    assert not marker.exists()
    with pytest.raises(DataError, match=r"index\.json: the index cannot be read \('sh' exited with status 3\)"):
        load_index("pipe:sh -c 'exit 3' sh {name}")
    with pytest.raises(DataError, match=r"cannot be read \(cannot run 'no-such-program': No such file"):
        load_index("pipe:no-such-program {name}")
    with pytest.raises(DataError, match=r"needs a '\{name\}' placeholder"):
        load_index("pipe:cat /sets/omniglot/index.json")
