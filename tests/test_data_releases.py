"""The few-shot benchmarks in their own release layouts (built small here, in the real file formats): packed with the
standard splits, read back as episodes through the shard reader, and every malformed file a one-line error."""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from metascale.config import ShardsData
from metascale.config.load import load_spec
from metascale.data import check_episodes
from metascale.data import splits as standard
from metascale.data.episodes import ShardTasks
from metascale.data.formats import ReadOptions, read_source
from metascale.data.index import load_index
from metascale.data.pack import pack
from metascale.data.tasks import SPLITS
from metascale.errors import DataError

pytestmark = pytest.mark.timeout(120)
REPO = Path(__file__).resolve().parents[1]

# CIFAR-100's taxonomy (superclass -> its 5 classes), as in the dataset's description (cs.toronto.edu/~kriz/cifar):
# the fixture's meta lists these, so the packaged CIFAR-FS split is checked against CIFAR-100's real class names.
# fmt: off
CIFAR100 = {
    "aquatic_mammals": "beaver dolphin otter seal whale", "fish": "aquarium_fish flatfish ray shark trout",
    "flowers": "orchid poppy rose sunflower tulip", "food_containers": "bottle bowl can cup plate",
    "fruit_and_vegetables": "apple mushroom orange pear sweet_pepper",
    "household_electrical_devices": "clock keyboard lamp telephone television",
    "household_furniture": "bed chair couch table wardrobe", "insects": "bee beetle butterfly caterpillar cockroach",
    "large_carnivores": "bear leopard lion tiger wolf", "large_man-made_outdoor_things": "bridge castle house road skyscraper",
    "large_natural_outdoor_scenes": "cloud forest mountain plain sea",
    "large_omnivores_and_herbivores": "camel cattle chimpanzee elephant kangaroo",
    "medium_mammals": "fox porcupine possum raccoon skunk", "non-insect_invertebrates": "crab lobster snail spider worm",
    "people": "baby boy girl man woman", "reptiles": "crocodile dinosaur lizard snake turtle",
    "small_mammals": "hamster mouse rabbit shrew squirrel", "trees": "maple_tree oak_tree palm_tree pine_tree willow_tree",
    "vehicles_1": "bicycle bus motorcycle pickup_truck train", "vehicles_2": "lawn_mower rocket streetcar tank tractor",
}
# fmt: on


def _rgb(seed: int, n: int, h: int = 10, w: int = 10) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def _dump(path: Path, obj) -> None:
    """Protocol 2, as the Python 2 era releases were written, naming numpy's module as numpy 1.x did."""
    path.write_bytes(pickle.dumps(obj, protocol=2).replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n"))


def _decoded(path: Path, size: int | None = None) -> np.ndarray:
    with Image.open(path) as im:
        im = im.convert("RGB")
        return np.asarray(im if size is None else im.resize((size, size), Image.Resampling.LANCZOS))


# ------------------------------------------------------------------------------------------ release builders
def _miniimagenet(root: Path) -> dict[str, tuple[str, list[np.ndarray]]]:
    """train/val/test.csv + images/: 5 classes per split, 4 JPEGs each. Returns class -> (split, decoded images)."""
    (root / "images").mkdir(parents=True)
    expected = {}
    for s, split in enumerate(SPLITS):
        rows = ["filename,label"]
        for c in range(5):
            label = f"n0{s}{c:06d}"
            for i, img in enumerate(_rgb(10 * s + c, 4)):
                name = f"{label}{i:08d}.jpg"
                Image.fromarray(img).save(root / "images" / name, quality=95)
                rows.append(f"{name},{label}")
                expected.setdefault(label, (split, []))[1].append(_decoded(root / "images" / name))
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return expected


def _tiered(root: Path, variant: str = "png") -> dict[str, tuple[str, list[np.ndarray]]]:
    """{split}_labels.pkl + {split}_images_png.pkl (PNG bytes as uint8 arrays, as cv2.imencode gives them) or
    {split}_images.npz (BGR). 5 classes per split in 2 categories, 3 images each, interleaved."""
    root.mkdir(parents=True, exist_ok=True)
    expected = {}
    for s, split in enumerate(SPLITS):
        names = [f"{split}-class-{c}" for c in range(5)]
        specific = np.tile(np.arange(5, dtype=np.int32), 3)  # images of a class are not contiguous
        general = (specific >= 3).astype(np.int32)
        images = _rgb(100 + s, len(specific), 12, 12)
        _dump(
            root / f"{split}_labels.pkl",
            {
                "label_specific": specific,
                "label_general": general,
                "label_specific_str": names,
                "label_general_str": [f"{split}-cat-a", f"{split}-cat-b"],
            },
        )
        if variant == "png":
            pngs = []
            for img in images:
                buf = io.BytesIO()
                Image.fromarray(img).save(buf, format="PNG")
                pngs.append(np.frombuffer(buf.getvalue(), np.uint8).reshape(-1, 1))
            _dump(root / f"{split}_images_png.pkl", pngs)
        else:
            np.savez(root / f"{split}_images.npz", images=images[..., ::-1])
        for c, name in enumerate(names):
            expected[name] = (split, list(images[specific == c]))
    return expected


def _cub(root: Path, classes: int = 20) -> dict[str, tuple[str, list[np.ndarray]]]:
    """images.txt, classes.txt, image_class_labels.txt, images/<class folder>/<file>.jpg of varying sizes."""
    (root / "images").mkdir(parents=True)
    image_lines, class_lines, label_lines, expected = [], [], [], {}
    image_id = 0
    for c in range(1, classes + 1):
        folder = f"{c:03d}.Bird_{c}"
        class_lines.append(f"{c} {folder}")
        (root / "images" / folder).mkdir()
        for i in range(3):
            img, image_id = _rgb(10 * c + i, 1, 9 + i, 12 - i)[0], image_id + 1
            rel = f"{folder}/Bird_{c}_{i:04d}.jpg"
            Image.fromarray(img).save(root / "images" / rel, quality=95)
            image_lines.append(f"{image_id} {rel}")
            label_lines.append(f"{image_id} {c}")
            expected.setdefault(folder, (standard.cub_split(c), []))[1].append(_decoded(root / "images" / rel, 8))
    for name, lines in (
        ("images.txt", image_lines),
        ("classes.txt", class_lines),
        ("image_class_labels.txt", label_lines),
    ):
        (root / name).write_text("\n".join(lines) + "\n")
    return expected


def _cifar100(root: Path) -> dict[str, list[np.ndarray]]:
    """cifar-100-python/{train,test,meta}: all 100 classes, 2 train + 1 test image each. Returns class -> images."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    coarse_names = sorted(CIFAR100)
    fine_names = sorted(n for names in CIFAR100.values() for n in names.split())
    coarse_of = {n: coarse_names.index(g) for g, names in CIFAR100.items() for n in names.split()}
    _dump(folder / "meta", {"fine_label_names": fine_names, "coarse_label_names": coarse_names})
    expected: dict[str, list[np.ndarray]] = {}
    for name, per_class in (("train", 2), ("test", 1)):
        fine = [c for _ in range(per_class) for c in range(100)]
        images = _rgb(len(name), len(fine), 32, 32)
        data = images.transpose(0, 3, 1, 2).reshape(len(fine), 3072)  # red plane, green plane, blue plane
        _dump(
            folder / name,
            {
                "data": data,
                "fine_labels": fine,
                "coarse_labels": [coarse_of[fine_names[c]] for c in fine],
                "filenames": [f"img_{i}.png".encode() for i in range(len(fine))],
                "batch_label": f"{name} batch".encode(),
            },
        )
        for c, img in zip(fine, images):
            expected.setdefault(fine_names[c], []).append(img)
    return expected


# ------------------------------------------------------------------------------------------ pack and read back
def _pack(fmt: str, src: Path, out: Path, size: int | None = None):
    source = read_source(fmt, src, ReadOptions(size=size))
    return pack(source.classes, out, source=source.info, progress=False, max_classes_per_shard=4)


def _check_episodes(root: Path, expected: dict[str, tuple[str, list[np.ndarray]]]) -> None:
    """5-way 1-shot 1-query episodes of every split: each image is one of that split's images, and episode labels
    match classes one to one."""
    owner = {
        np.ascontiguousarray(img.transpose(2, 0, 1)).tobytes(): (name, split)
        for name, (split, imgs) in expected.items()
        for img in imgs
    }
    for split in SPLITS:
        batch = ShardTasks(ShardsData(url=str(root), ways=5, shots=1, queries=1), split, 0, str(root)).batch_uint8(
            3, [0, 1]
        )
        assert batch.support_x.shape[:3] == (2, 5, 3) and batch.query_x.shape[:3] == (2, 5, 3)
        for t in range(2):
            pairs = set()
            for x, y in ((batch.support_x, batch.support_y), (batch.query_x, batch.query_y)):
                for img, label in zip(x[t].numpy(), y[t].tolist()):
                    name, img_split = owner[img.tobytes()]
                    assert img_split == split
                    pairs.add((label, name))
            assert len(pairs) == 5 and {lab for lab, _ in pairs} == set(range(5))  # 5 classes, one label each


def _check_index(out: Path, expected: dict[str, tuple[str, list[np.ndarray]]]) -> None:
    index = load_index(str(out))
    assert {c.name: (c.split, c.count) for c in index.classes} == {n: (s, len(v)) for n, (s, v) in expected.items()}


def test_miniimagenet_csv_splits(tmp_path):
    expected = _miniimagenet(tmp_path / "mini")
    _pack("miniimagenet", tmp_path / "mini", tmp_path / "out")
    _check_index(tmp_path / "out", expected)
    assert load_index(str(tmp_path / "out")).shape == (3, 10, 10)
    _check_episodes(tmp_path / "out", expected)


@pytest.mark.parametrize("variant", ["png", "npz"])
def test_tieredimagenet_pickles(tmp_path, variant):
    expected = _tiered(tmp_path / "tiered", variant)
    _pack("tieredimagenet", tmp_path / "tiered", tmp_path / "out")
    _check_index(tmp_path / "out", expected)
    groups = {c.name: c.alphabet for c in load_index(str(tmp_path / "out")).classes}
    assert groups["train-class-0"] == "train-cat-a" and groups["val-class-4"] == "val-cat-b"
    _check_episodes(tmp_path / "out", expected)  # the npz's BGR comes back as the PNGs' RGB


def test_cub_standard_split(tmp_path):
    expected = _cub(tmp_path / "CUB_200_2011")
    _pack("cub", tmp_path / "CUB_200_2011", tmp_path / "out", size=8)
    _check_index(tmp_path / "out", expected)
    split = {c.name: c.split for c in load_index(str(tmp_path / "out")).classes}
    assert split["001.Bird_1"] == "train" and split["002.Bird_2"] == "val" and split["004.Bird_4"] == "test"
    _check_episodes(tmp_path / "out", expected)


def test_cub_split_is_chen_et_al():
    sizes = {s: sum(standard.cub_split(c) == s for c in range(1, 201)) for s in SPLITS}
    assert sizes == {"train": 100, "val": 50, "test": 50}
    assert [standard.cub_split(c) for c in range(1, 9)] == ["train", "val", "train", "test"] * 2


@pytest.mark.parametrize("fmt", ["cifarfs", "fc100"])
def test_cifar100_splits(tmp_path, fmt):
    images = _cifar100(tmp_path)
    _pack(fmt, tmp_path, tmp_path / "out")  # SRC may be the folder above cifar-100-python
    index = load_index(str(tmp_path / "out"))
    per_split = {s: {c.name for c in index.classes if c.split == s} for s in SPLITS}
    assert [len(per_split[s]) for s in SPLITS] == ([64, 16, 20] if fmt == "cifarfs" else [60, 20, 20])
    superclass = {c.name: c.alphabet for c in index.classes}
    assert superclass["apple"] == "fruit_and_vegetables" and all(c.count == 3 for c in index.classes)
    if fmt == "cifarfs":
        assert per_split == {s: set(standard.CIFAR_FS[s]) for s in SPLITS}
    else:
        for s in SPLITS:  # whole superclasses per split, the TADAM split's
            assert {superclass[n] for n in per_split[s]} == {
                standard.CIFAR100_COARSE[g] for g in standard.FC100_COARSE[s]
            }
    expected = {c.name: (c.split, images[c.name]) for c in index.classes}
    _check_episodes(tmp_path / "out", expected)


def test_the_benchmark_job_reads_a_packed_release(tmp_path):
    """jobs/miniimagenet-maml.yaml, pointed at a packed CIFAR-FS as docs/data.md says, plans its episodes from it."""
    _cifar100(tmp_path)
    _pack("cifarfs", tmp_path, tmp_path / "out")
    job, url = REPO / "jobs" / "miniimagenet-maml.yaml", f"data.url={tmp_path / 'out'}"
    check_episodes(load_spec(job, [url, "model.image_size=32", "data.queries=2"]))  # 3 images a class: 1 + 2 fit
    with pytest.raises(DataError, match=r"has 3 examples, fewer than shots\+queries=16"):
        check_episodes(load_spec(job, [url, "model.image_size=32"]))  # the paper's 15 queries do not


# ------------------------------------------------------------------------------------------ malformed files
def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _edit(path: Path, old: str, new: str) -> None:
    path.write_text(path.read_text().replace(old, new, 1))


class _Evil:
    """A pickle that would run a command (`true`, harmless) if loaded: the classic malicious pickle. os.system, not
    print: Ray replaces builtins.print once its tqdm is imported, and print then pickles under Ray's name."""

    def __reduce__(self):
        return (os.system, ("true",))


# fmt: off
MALFORMED = {
    "mini-missing-csv": ("miniimagenet", _miniimagenet, lambda r: (r / "val.csv").unlink(), r"val\.csv: does not exist"),
    "mini-bad-header": ("miniimagenet", _miniimagenet, lambda r: _edit(r / "test.csv", "filename,label", "file,class"),
                        r"test\.csv: expected the header 'filename,label'"),
    "mini-bad-label": ("miniimagenet", _miniimagenet, lambda r: _edit(r / "train.csv", ",n00000000\n", ",../n0\n"),
                       r"train\.csv:2: expected 'filename,label' with plain names"),
    "mini-missing-image": ("miniimagenet", _miniimagenet, lambda r: (r / "images" / "n0100000300000002.jpg").unlink(),
                           r"images/n0100000300000002\.jpg: does not exist \(listed in .*val\.csv:16\)"),
    "mini-shared-class": ("miniimagenet", _miniimagenet, lambda r: _edit(r / "test.csv", ",n02000000", ",n00000000"),
                          r"test\.csv:2: class 'n00000000' is also in train\.csv"),
    "tiered-truncated": ("tieredimagenet", _tiered, lambda r: _truncate(r / "val_labels.pkl"),
                         r"val_labels\.pkl: not a readable pickle"),
    "tiered-wrong-keys": ("tieredimagenet", _tiered, lambda r: _dump(r / "train_labels.pkl", {"labels": [0]}),
                          r"train_labels\.pkl: missing keys \['label_specific', "),
    "tiered-missing-images": ("tieredimagenet", _tiered, lambda r: (r / "test_images_png.pkl").unlink(),
                              r"test_images_png\.pkl: does not exist \(nor test_images\.npz"),
    "tiered-count": ("tieredimagenet", _tiered, lambda r: _dump(r / "val_images_png.pkl", [b"x"]),
                     r"val_images_png\.pkl: 1 images, but val_labels\.pkl labels 15"),
    "tiered-bad-label": ("tieredimagenet", _tiered, lambda r: _dump(r / "train_labels.pkl", {
        "label_specific": [0, 7], "label_general": [0, 0], "label_specific_str": ["a"], "label_general_str": ["g"]}),
        r"train_labels\.pkl: 'label_specific' holds label 7, outside 0\.\.0"),
    "tiered-code": ("tieredimagenet", _tiered, lambda r: _dump(r / "train_labels.pkl", _Evil()),
                    r"train_labels\.pkl: not a readable pickle \(UnpicklingError: it refers to (posix|os)\.system"),
    "cub-missing-labels": ("cub", _cub, lambda r: (r / "image_class_labels.txt").unlink(),
                           r"image_class_labels\.txt: does not exist"),
    "cub-bad-line": ("cub", _cub, lambda r: _edit(r / "classes.txt", "3 003", "three 003"),
                     r"classes\.txt:3: expected '<class id> <name>'"),
    "cub-unknown-class": ("cub", _cub, lambda r: _edit(r / "image_class_labels.txt", "4 2\n", "4 99\n"),
                          r"image_class_labels\.txt:4: class '99' is not in classes\.txt"),
    "cub-outside": ("cub", _cub, lambda r: _edit(r / "images.txt", "1 001", "1 ../001"),
                    r"images\.txt:1: '\.\./001\.Bird_1/Bird_1_0000\.jpg' is not a relative path inside"),
    "cub-missing-image": ("cub", _cub, lambda r: (r / "images" / "005.Bird_5" / "Bird_5_0001.jpg").unlink(),
                          r"Bird_5_0001\.jpg: does not exist \(listed in .*images\.txt:14\)"),
    "cifar-truncated": ("cifarfs", _cifar100, lambda r: _truncate(r / "cifar-100-python" / "train"),
                        r"cifar-100-python/train: not a readable pickle"),
    "cifar-wrong-keys": ("fc100", _cifar100, lambda r: _dump(r / "cifar-100-python" / "meta", {"label_names": []}),
                         r"meta: missing keys \['fine_label_names', 'coarse_label_names'\]"),
    "cifar-missing-test": ("cifarfs", _cifar100, lambda r: (r / "cifar-100-python" / "test").unlink(),
                           r"cifar-100-python/test: does not exist"),
}
# fmt: on


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_release_is_one_line_naming_the_file(tmp_path, case, capsys):
    fmt, build, breakit, message = MALFORMED[case]
    build(tmp_path / "src")
    breakit(tmp_path / "src")
    with pytest.raises(DataError, match=message) as e:
        _pack(fmt, tmp_path / "src", tmp_path / "out", size=8)
    assert "\n" not in str(e.value) and str(tmp_path / "src") in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # nothing half-packed left
    assert "code ran" not in capsys.readouterr().out


def test_pack_cli_release_error_is_one_line_exit_2(tmp_path):
    _tiered(tmp_path / "tiered")
    _truncate(tmp_path / "tiered" / "train_images_png.pkl")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "metascale",
            "data",
            "pack",
            str(tmp_path / "tiered"),
            str(tmp_path / "out"),
            "--format",
            "tieredimagenet",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {tmp_path}/tiered/train_images_png.pkl: not a readable pickle"), result.stderr
