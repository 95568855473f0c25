"""Packing each on-disk layout into task shards and reading it back: every image exactly once, splits disjoint."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from metascale.data.formats import ReadOptions, read_source
from metascale.data.index import load_index
from metascale.data.pack import SourceClass, pack
from metascale.data.store import load_store
from metascale.data.tasks import SPLITS
from metascale.errors import DataError


def _images(seed: int, n: int, size: int = 12) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size), dtype=np.uint8)


def _read_all(root: str, workers: int = 0) -> dict[str, tuple[str, np.ndarray]]:
    """class name -> (split, images [n, H, W]) as the reader gives them back."""
    index = load_index(root)
    out = {}
    for split in SPLITS:
        store = load_store(index, root, split, workers=workers)
        for cid, at in store.offsets.items():
            out[index.classes[cid].name] = (split, store.images[at : at + store.counts[cid], 0])
    return out


def test_numpy_roundtrip_every_image_once_with_its_label(tmp_path):
    images = _images(0, 30 * 7)
    labels = np.repeat(np.arange(30), 7)
    np.savez(tmp_path / "set.npz", images=images, labels=labels)
    src = read_source("numpy", tmp_path / "set.npz", ReadOptions(seed=3))
    pack(src.classes, tmp_path / "out", progress=False, max_classes_per_shard=4)
    back = _read_all(str(tmp_path / "out"))
    assert sorted(back, key=int) == [str(i) for i in range(30)]
    for i in range(30):
        np.testing.assert_array_equal(back[str(i)][1], images[labels == i])  # same images, same order, same class
    per_split = {s: {n for n, (sp, _) in back.items() if sp == s} for s in SPLITS}
    assert all(per_split[s] for s in SPLITS) and sum(len(v) for v in per_split.values()) == 30
    index = load_index(str(tmp_path / "out"))
    assert all(index.shards[c.shard].split == c.split for c in index.classes)  # shards never mix splits
    assert _read_all(str(tmp_path / "out"), workers=2).keys() == back.keys()


def test_numpy_explicit_splits_and_alphabets(tmp_path):
    labels = np.repeat(np.arange(6), 4)
    splits = np.array(["train", "train", "val", "test", "test", "train"])
    np.savez(
        tmp_path / "s.npz", images=_images(1, 24), labels=labels, splits=splits, alphabets=np.array(list("aabccd"))
    )
    src = read_source("numpy", tmp_path / "s.npz", ReadOptions())
    index = pack(src.classes, tmp_path / "o", progress=False)
    assert [c.split for c in index.classes] == list(splits)
    assert [c.alphabet for c in index.classes] == list("aabccd")


def _write_pngs(folder, images):
    folder.mkdir(parents=True)
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i:02d}.png")


def test_omniglot_layout_splits_by_alphabet(tmp_path):
    src = tmp_path / "omniglot"
    k = 0
    for part, alphabets in (("images_background", 6), ("images_evaluation", 2)):
        for a in range(alphabets):
            for ch in range(3):
                _write_pngs(src / part / f"{part[7:10]}{a}" / f"character{ch:02d}", _images(k, 4, 20))
                k += 1
    source = read_source("omniglot", src, ReadOptions(size=10, val_fraction=0.34, seed=0))
    index = pack(source.classes, tmp_path / "out", progress=False)
    by_alphabet = {}
    for c in index.classes:
        by_alphabet.setdefault(c.alphabet, set()).add(c.split)
    assert all(len(s) == 1 for s in by_alphabet.values())  # an alphabet never straddles splits
    assert {a for a, s in by_alphabet.items() if s == {"test"}} == {"eva0", "eva1"}
    assert {"train", "val"} <= set().union(*by_alphabet.values())
    back = _read_all(str(tmp_path / "out"))
    split, imgs = back["bac0/character00"]
    original = np.asarray(Image.fromarray(_images(0, 4, 20)[0]).resize((10, 10), Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(imgs[0], 255 - original)  # resized, inverted (strokes bright)
    assert imgs.shape == (4, 10, 10)


@pytest.mark.parametrize("with_split_dirs", [True, False])
def test_imagefolder_layouts(tmp_path, with_split_dirs):
    src = tmp_path / "if"
    names = [f"n{i:03d}" for i in range(10)]
    for i, n in enumerate(names):
        rgb = np.random.default_rng(i).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
        _write_pngs(src / (SPLITS[i % 3] if with_split_dirs else "") / n, rgb)
    source = read_source("imagefolder", src, ReadOptions(seed=1))
    index = pack(source.classes, tmp_path / "out", progress=False)
    assert index.shape == (3, 8, 8) and len(index.classes) == 10
    if with_split_dirs:
        assert [c.split for c in sorted(index.classes, key=lambda c: c.name)] == [SPLITS[i % 3] for i in range(10)]
    back = _read_all(str(tmp_path / "out"))
    assert sum(len(v[1]) for v in back.values()) == 50


def test_a_failed_pack_leaves_nothing_a_reader_accepts(tmp_path):
    def classes():
        yield SourceClass("a", "a", "train", list(_images(0, 3)))
        raise KeyboardInterrupt  # as a kill mid-pack would

    with pytest.raises(KeyboardInterrupt):
        pack(classes(), tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []  # no OUT, no .partial-* left behind
    with pytest.raises(DataError, match="no index"):
        load_index(str(tmp_path / "out"))


def test_a_packed_set_gets_the_umask_modes(tmp_path, umask):
    """Shared volumes: pods running as another user read the set when the umask lets them (it was 0700/0600)."""
    classes = [SourceClass(f"k{c}", f"k{c}", SPLITS[c % 3], list(_images(c, 3))) for c in range(6)]
    for _ in range(2):  # the second pack replaces the first (--overwrite): same modes
        pack(classes, tmp_path / "out", progress=False, max_classes_per_shard=1, overwrite=True)
    out = tmp_path / "out"
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [out, *out.iterdir()]}
    assert len(modes) == 8 and modes.pop("out") == 0o777 & ~umask  # OUT, index.json and 6 shards
    assert set(modes.values()) == {0o666 & ~umask}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_write_that_fails_midway_is_one_data_error_and_leaves_nothing(tmp_path, monkeypatch):
    def full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("metascale.data.pack.atomic_write", full)
    with pytest.raises(DataError, match=r"out: packing failed \(\[Errno 28\] No space left on device\)$"):
        pack([SourceClass("a", "a", "train", list(_images(0, 2)))], tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_pack_refuses_mixed_shapes_and_existing_output(tmp_path):
    bad = [SourceClass("a", "a", "train", [np.zeros((4, 4), np.uint8), np.zeros((5, 5), np.uint8)])]
    with pytest.raises(DataError, match="differs"):
        pack(bad, tmp_path / "o", progress=False)
    pack([SourceClass("a", "a", "train", [np.zeros((4, 4), np.uint8)])], tmp_path / "o2", progress=False)
    with pytest.raises(DataError, match="already exists"):
        pack([SourceClass("a", "a", "train", [np.zeros((4, 4), np.uint8)])], tmp_path / "o2", progress=False)


def test_digits_are_real_handwriting_held_out_for_test(tmp_path):
    source = read_source("digits", tmp_path, ReadOptions())
    index = pack(source.classes, tmp_path / "d", progress=False)
    assert len(index.classes) == 10 and {c.split for c in index.classes} == {"test"}
    assert sum(c.count for c in index.classes) == 1797 and index.shape == (1, 28, 28)


def _pack_cli(*args: str) -> subprocess.CompletedProcess:
    """`metascale data pack ARGS` as a user runs it: a new process, through the real entry point."""
    return subprocess.run(
        [sys.executable, "-m", "metascale", "data", "pack", *args], capture_output=True, text=True, timeout=120
    )


def _assert_one_line_error(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]  # above it only the progress bar
    assert last.startswith("error: ") and message in last, result.stderr


def test_pack_cli_a_first_image_that_is_not_an_image_is_one_line(tmp_path):
    (tmp_path / "src" / "a").mkdir(parents=True)
    (tmp_path / "src" / "a" / "00.png").write_text("not an image, whatever the name says")
    _write_pngs(tmp_path / "src" / "b", _images(0, 2))
    result = _pack_cli(str(tmp_path / "src"), str(tmp_path / "out"), "--format", "imagefolder")
    _assert_one_line_error(result, f"{tmp_path}/src/a/00.png: image does not decode (cannot identify image file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # nothing half-packed left


@pytest.mark.parametrize("where", ["under-a-file", "under-proc"])
def test_pack_cli_an_unwritable_output_is_one_line(tmp_path, where):
    """Both fail for root too (chmod would not stop root): a path below a regular file, and a new folder in /proc."""
    np.savez(tmp_path / "set.npz", images=_images(0, 12), labels=np.repeat(np.arange(6), 2))
    (tmp_path / "file").write_text("a regular file")
    out = tmp_path / "file" / "out" if where == "under-a-file" else Path("/proc/metascale-test/out")
    result = _pack_cli(str(tmp_path / "set.npz"), str(out), "--format", "numpy")
    why = f"{tmp_path}/file is a file, not a folder" if where == "under-a-file" else "No such file or directory"
    _assert_one_line_error(result, f"{out}: cannot create the packed set there ({why}")
