"""The few-shot benchmarks as their authors release them -> classes to pack: mini-ImageNet (Ravi & Larochelle's CSV
splits + images/), tiered-ImageNet (Ren et al. 2018's per-split pickles), CUB-200-2011 (its own index files, split as
Chen et al. 2019), CIFAR-FS and FC100 (CIFAR-100's python pickles, split as their papers: data/splits.py).

Nothing is downloaded. A missing or malformed file is a one-line DataError naming it. File names read from a
listing must be plain relative paths inside SRC; pickles are read by an unpickler that builds only numpy arrays and
plain containers (a pickle naming any other callable is refused, never run).
"""

from __future__ import annotations

import csv
import io
import pickle
import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from metascale.data import splits as standard
from metascale.data.formats import ReadOptions, Source, _resize, load_image
from metascale.data.pack import SourceClass
from metascale.data.tasks import SPLITS, Split
from metascale.errors import DataError

PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


# ------------------------------------------------------------------------------------------ shared helpers
def _need(path: Path, what: str = "") -> Path:
    if not path.is_file():
        raise DataError(f"{path}: does not exist{f' ({what})' if what else ''}")
    return path


def _inside(root: Path, rel: str, where: str) -> Path:
    """A relative path read from a listing: no absolute path, no `..`, no empty part (it stays inside root)."""
    parts = rel.split("/")
    if rel.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in rel or "\0" in rel:
        raise DataError(f"{where}: '{rel}' is not a relative path inside {root}")
    return root.joinpath(*parts)


_ARRAY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 hold bytes
}


class _ArrayUnpickler(pickle.Unpickler):
    """The benchmarks' pickles hold dicts, lists, strings, bytes and numpy arrays; nothing else may be built."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ARRAY_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a data file never needs (not loaded)")


def _load_pickle(path: Path) -> Any:
    """Python 2 pickles (CIFAR-100, tiered-ImageNet) read as latin1, the encoding numpy arrays need."""
    _need(path)
    try:
        with open(path, "rb") as f:
            return _ArrayUnpickler(f, encoding="latin1").load()
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or e})") from None
    except Exception as e:  # truncated or corrupt pickles raise many types; all mean the file is malformed
        raise DataError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from None


def _str_keys(obj: Any, path: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    """A pickled dict with the given keys (bytes keys, as `encoding='bytes'` readers see them, count too)."""
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a dict with keys {list(keys)}, got {type(obj).__name__}")
    d = {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in obj.items()}
    missing = [k for k in keys if k not in d]
    if missing:
        raise DataError(f"{path}: missing keys {missing} (found {sorted(d)[:8]})")
    return d


def _names(values: Any, path: Path, key: str) -> list[str]:
    try:
        return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]
    except (TypeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: '{key}' is not a list of names ({e})") from None


def _int_labels(values: Any, n_names: int, path: Path, key: str) -> np.ndarray:
    try:
        labels = np.asarray(values)
        ok = labels.ndim == 1 and np.issubdtype(labels.dtype, np.integer)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise DataError(f"{path}: '{key}' is not a list of integer labels")
    bad = labels[(labels < 0) | (labels >= n_names)]
    if len(bad):
        raise DataError(f"{path}: '{key}' holds label {int(bad[0])}, outside 0..{n_names - 1}")
    return labels.astype(np.int64)


def _decode(data: Any, where: str, opts: ReadOptions) -> np.ndarray:
    """PNG/JPEG bytes (or a uint8 array of them, as cv2.imencode returns) -> RGB uint8, resized to --size."""
    try:
        raw = data if isinstance(data, bytes) else np.asarray(data, dtype=np.uint8).tobytes()
        with Image.open(io.BytesIO(raw)) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, TypeError, ValueError) as e:
        raise DataError(f"{where}: image does not decode ({e})") from None
    return _resize(arr, opts.size)


# ------------------------------------------------------------------------------------------ mini-ImageNet
def read_miniimagenet(src: Path, opts: ReadOptions) -> Source:
    """Ravi & Larochelle's `train.csv`, `val.csv`, `test.csv` (header `filename,label`, one row per image) and
    `images/<filename>`: 64/16/20 classes of 600 images. Classes in the order the CSVs first name them."""
    images_dir = src / "images"
    if not images_dir.is_dir():
        raise DataError(f"{images_dir}: does not exist (mini-ImageNet's images folder)")
    plan: dict[str, tuple[Split, list[Path]]] = {}
    for split in SPLITS:
        path = _need(src / f"{split}.csv", "one of mini-ImageNet's train.csv, val.csv, test.csv")
        try:
            with open(path, newline="") as f:
                rows = list(csv.reader(f))
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise DataError(f"{path}: cannot be read as CSV ({e})") from None
        if not rows or [c.strip() for c in rows[0]] != ["filename", "label"]:
            raise DataError(
                f"{path}: expected the header 'filename,label' (got {','.join(rows[0]) if rows else 'an empty file'!r})"
            )
        for line, row in enumerate(rows[1:], start=2):
            if not row:
                continue
            if len(row) != 2 or not PLAIN_NAME.fullmatch(row[0]) or not PLAIN_NAME.fullmatch(row[1]):
                raise DataError(f"{path}:{line}: expected 'filename,label' with plain names, got {','.join(row)!r}")
            filename, label = row
            split_of, files = plan.setdefault(label, (split, []))
            if split_of != split:
                raise DataError(
                    f"{path}:{line}: class '{label}' is also in {split_of}.csv (splits must not share classes)"
                )
            image = images_dir / filename
            if not image.is_file():
                raise DataError(f"{image}: does not exist (listed in {path}:{line})")
            files.append(image)

    def classes() -> Iterator[SourceClass]:
        for label, (split, files) in plan.items():
            yield SourceClass(label, label, split, [load_image(f, opts, grey=False) for f in files])

    return Source(classes(), len(plan), {"format": "miniimagenet", "src": str(src)})


# ------------------------------------------------------------------------------------------ tiered-ImageNet
TIERED_KEYS = ("label_specific", "label_specific_str", "label_general", "label_general_str")


def read_tieredimagenet(src: Path, opts: ReadOptions) -> Source:
    """Ren et al. 2018's release (github.com/renmengye/few-shot-ssl-public, fewshot/data/tiered_imagenet.py): per
    split `{split}_labels.pkl` (a dict: `label_specific` [N] class per image, `label_specific_str` class names,
    `label_general` [N] and `label_general_str`: the 34 ImageNet categories, kept as each class's group) and either
    `{split}_images_png.pkl` (a list of PNG-encoded images, as cv2.imencode wrote them) or the decompressed
    `{split}_images.npz` (`images` [N, 84, 84, 3], BGR as cv2 decoded it; flipped to RGB here, so both variants pack
    the same pixels). 351/97/160 classes."""
    plan: list[tuple[str, str, Split, Any, np.ndarray, str]] = []  # name, group, split, images, indices, file
    for split in SPLITS:
        labels_path = src / f"{split}_labels.pkl"
        png, npz = src / f"{split}_images_png.pkl", src / f"{split}_images.npz"
        if not png.is_file() and not npz.is_file():
            raise DataError(f"{png}: does not exist (nor {npz.name}: tiered-ImageNet's images of split '{split}')")
        labels = _str_keys(_load_pickle(_need(labels_path)), labels_path, TIERED_KEYS)
        names = _names(labels["label_specific_str"], labels_path, "label_specific_str")
        groups = _names(labels["label_general_str"], labels_path, "label_general_str")
        specific = _int_labels(labels["label_specific"], len(names), labels_path, "label_specific")
        general = _int_labels(labels["label_general"], len(groups), labels_path, "label_general")
        if png.is_file():
            images, images_path = _load_pickle(png), png
            if not isinstance(images, (list, tuple)):
                raise DataError(f"{png}: expected a list of PNG-encoded images, got {type(images).__name__}")
        else:
            images, images_path = _load_npz_images(npz), npz
        if not (len(images) == len(specific) == len(general)):
            raise DataError(
                f"{images_path}: {len(images)} images, but {labels_path.name} labels "
                f"{len(specific)} (label_specific) and {len(general)} (label_general)"
            )
        for c, name in enumerate(names):
            idx = np.flatnonzero(specific == c)
            if not len(idx):
                raise DataError(f"{labels_path}: class {c} '{name}' has no images")
            group = {int(g) for g in general[idx]}
            if len(group) != 1:
                raise DataError(
                    f"{labels_path}: class {c} '{name}' lies in several label_general categories {sorted(group)}"
                )
            plan.append((name, groups[group.pop()], split, images, idx, str(images_path)))

    def classes() -> Iterator[SourceClass]:
        for name, group, split, images, idx, where in plan:
            if isinstance(images, np.ndarray):
                imgs = [_resize(np.ascontiguousarray(images[i, :, :, ::-1]), opts.size) for i in idx]
            else:
                imgs = [_decode(images[i], f"{where} image {i}", opts) for i in idx]
            yield SourceClass(name, group, split, imgs)

    return Source(classes(), len(plan), {"format": "tieredimagenet", "src": str(src)})


def _load_npz_images(path: Path) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as z:
            images = z["images"]
    except KeyError:
        raise DataError(f"{path}: missing array 'images'") from None
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: not a readable .npz ({e})") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise DataError(f"{path}: 'images' must be uint8 [N, H, W, 3], got {images.dtype} {list(images.shape)}")
    return images


# ------------------------------------------------------------------------------------------ CUB-200-2011
def read_cub(src: Path, opts: ReadOptions) -> Source:
    """CUB-200-2011's `images.txt` (`<image id> <path>`), `classes.txt` (`<class id> <name>`),
    `image_class_labels.txt` (`<image id> <class id>`) and `images/<path>`; 100/50/50 classes as Chen et al. 2019
    (data/splits.py). Images vary in size: pack with --size."""
    images_dir = src / "images"
    if not images_dir.is_dir():
        raise DataError(f"{images_dir}: does not exist (CUB-200-2011's images folder)")
    paths = _id_table(src / "images.txt", "<image id> <path>")
    class_names = _id_table(src / "classes.txt", "<class id> <name>")
    labels_path = src / "image_class_labels.txt"
    labels = _id_table(labels_path, "<image id> <class id>")
    members: dict[int, list[Path]] = {c: [] for c in sorted(class_names)}
    for image_id, (rel, line) in sorted(paths.items()):
        if image_id not in labels:
            raise DataError(f"{labels_path}: image {image_id} (images.txt line {line}) has no class")
        text, label_line = labels[image_id]
        if not text.isdigit() or int(text) not in class_names:
            raise DataError(f"{labels_path}:{label_line}: class '{text}' is not in classes.txt")
        image = _inside(images_dir, rel, f"{src / 'images.txt'}:{line}")
        if not image.is_file():
            raise DataError(f"{image}: does not exist (listed in {src / 'images.txt'}:{line})")
        members[int(text)].append(image)
    for c, (name, line) in class_names.items():
        if not 1 <= c <= 200:
            raise DataError(f"{src / 'classes.txt'}:{line}: class id {c} is not one of CUB-200-2011's 1..200")
        if not members[c]:
            raise DataError(f"{src / 'classes.txt'}:{line}: class {c} '{name}' has no images")

    def classes() -> Iterator[SourceClass]:
        for c, files in members.items():
            name = class_names[c][0]
            yield SourceClass(name, name, standard.cub_split(c), [load_image(f, opts, grey=False) for f in files])

    return Source(classes(), len(members), {"format": "cub", "src": str(src), "split": "Chen et al. 2019"})


def _id_table(path: Path, form: str) -> dict[int, tuple[str, int]]:
    """`<integer id> <text>` per line -> {id: (text, line number)}."""
    _need(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot be read ({e})") from None
    table: dict[int, tuple[str, int]] = {}
    for n, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        parts = text.split(maxsplit=1)
        if len(parts) != 2 or not parts[0].isdigit():
            raise DataError(f"{path}:{n}: expected '{form}', got {text!r}")
        if int(parts[0]) in table:
            raise DataError(f"{path}:{n}: id {parts[0]} appears twice")
        table[int(parts[0])] = (parts[1].strip(), n)
    if not table:
        raise DataError(f"{path}: empty (expected lines '{form}')")
    return table


# ------------------------------------------------------------------------------------------ CIFAR-FS, FC100
def read_cifarfs(src: Path, opts: ReadOptions) -> Source:
    """CIFAR-FS (Bertinetto et al. 2019): CIFAR-100's 100 classes (train and test pickles together, 600 images each)
    split 64/16/20 by class name (data/splits.py)."""
    split_of = {name: s for s, names in standard.CIFAR_FS.items() for name in names}
    return _read_cifar100(src, opts, "cifarfs", lambda fine, coarse, meta: _by_name(split_of, fine, meta))


def read_fc100(src: Path, opts: ReadOptions) -> Source:
    """FC100 (Oreshkin et al. 2018): CIFAR-100 split by superclass, 12/4/4 superclasses = 60/20/20 classes."""
    split_of = {c: s for s, coarse in standard.FC100_COARSE.items() for c in coarse}
    return _read_cifar100(src, opts, "fc100", lambda fine, coarse, meta: split_of[coarse])


def _by_name(split_of: dict[str, Split], name: str, meta: Path) -> Split:
    if name not in split_of:
        raise DataError(f"{meta}: fine label '{name}' is not one of CIFAR-100's classes in the CIFAR-FS split")
    return split_of[name]


def _read_cifar100(src: Path, opts: ReadOptions, fmt: str, split_for) -> Source:
    """`train`, `test`, `meta` of cifar-100-python (SRC, or SRC/cifar-100-python): `data` [N, 3072] uint8 (the red,
    green and blue 32x32 planes of each image), `fine_labels`, `coarse_labels`; meta's `fine_label_names` and
    `coarse_label_names`. A class's group (`alphabet`) is its superclass."""
    if not (src / "meta").exists() and (src / "cifar-100-python").is_dir():
        src = src / "cifar-100-python"
    meta_path = src / "meta"
    meta = _str_keys(_load_pickle(meta_path), meta_path, ("fine_label_names", "coarse_label_names"))
    fine_names = _names(meta["fine_label_names"], meta_path, "fine_label_names")
    coarse_names = _names(meta["coarse_label_names"], meta_path, "coarse_label_names")
    if tuple(coarse_names) != standard.CIFAR100_COARSE:
        raise DataError(f"{meta_path}: coarse_label_names are not CIFAR-100's 20 superclasses in their order")
    parts = []
    for name in ("train", "test"):
        path = src / name
        d = _str_keys(_load_pickle(path), path, ("data", "fine_labels", "coarse_labels"))
        data = d["data"]
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise DataError(
                f"{path}: 'data' must be uint8 [N, 3072], got {getattr(data, 'dtype', type(data).__name__)} "
                f"{list(getattr(data, 'shape', []))}"
            )
        fine = _int_labels(d["fine_labels"], len(fine_names), path, "fine_labels")
        coarse = _int_labels(d["coarse_labels"], len(coarse_names), path, "coarse_labels")
        if not len(fine) == len(coarse) == len(data):
            raise DataError(f"{path}: {len(data)} images, {len(fine)} fine_labels, {len(coarse)} coarse_labels")
        parts.append((data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), fine, coarse))
    images = np.concatenate([p[0] for p in parts])
    fine = np.concatenate([p[1] for p in parts])
    coarse = np.concatenate([p[2] for p in parts])
    plan = []
    for c, name in enumerate(fine_names):
        idx = np.flatnonzero(fine == c)
        if not len(idx):
            raise DataError(f"{src}: class {c} '{name}' has no images in train or test")
        groups = {int(g) for g in coarse[idx]}
        if len(groups) != 1:
            raise DataError(f"{src}: class {c} '{name}' has several coarse labels {sorted(groups)}")
        g = groups.pop()
        plan.append((name, coarse_names[g], split_for(name, g, meta_path), idx))

    def classes() -> Iterator[SourceClass]:
        for name, group, split, idx in plan:
            yield SourceClass(name, group, split, [_resize(images[i], opts.size) for i in idx])

    return Source(classes(), len(plan), {"format": fmt, "src": str(src)})
