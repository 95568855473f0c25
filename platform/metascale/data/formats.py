"""Datasets on disk -> classes to pack: Omniglot's layout, ImageFolder, numpy arrays, scikit-learn's digits (and,
in releases.py, the few-shot benchmarks' own release layouts).

Splits are decided here, per class (per alphabet where the set has alphabets), and recorded in the index, so
meta-train, meta-val and meta-test classes can never mix.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from metascale.data.pack import SourceClass, iter_split_by_group
from metascale.data.tasks import SPLITS, Split
from metascale.errors import DataError

Format = Literal[
    "omniglot", "imagefolder", "numpy", "digits", "miniimagenet", "tieredimagenet", "cub", "cifarfs", "fc100"
]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass(frozen=True)
class Source:
    """What to pack: classes (lazily loaded), their number (for the progress bar) and a description."""

    classes: Iterator[SourceClass]
    total: int
    info: dict


@dataclass(frozen=True)
class ReadOptions:
    size: int | None = None  # resize every image to size x size (None: keep, all must agree)
    fractions: tuple[float, float, float] = (0.64, 0.16, 0.2)  # train/val/test share of classes (or alphabets)
    val_fraction: float = 0.2  # Omniglot: share of images_background alphabets held out for meta-val
    seed: int = 0
    invert: bool | None = None  # None: the format's default (Omniglot: True, so strokes are bright on black)


def read_source(fmt: Format, src: str | Path, opts: ReadOptions) -> Source:
    from metascale.data import releases  # the benchmarks' own release layouts (it imports this module)

    readers: dict[str, Callable[[Path, ReadOptions], Source]] = {
        "omniglot": read_omniglot,
        "imagefolder": read_imagefolder,
        "numpy": read_numpy,
        "digits": read_digits,
        "miniimagenet": releases.read_miniimagenet,
        "tieredimagenet": releases.read_tieredimagenet,
        "cub": releases.read_cub,
        "cifarfs": releases.read_cifarfs,
        "fc100": releases.read_fc100,
    }
    if fmt not in readers:
        raise DataError(f"unknown format '{fmt}' (expected one of {sorted(readers)})")
    src = Path(src)
    if fmt != "digits" and not src.exists():
        raise DataError(f"{src}: does not exist")
    return readers[fmt](src, opts)


def load_image(path: Path, opts: ReadOptions, grey: bool, invert: bool = False) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im = im.convert("L" if grey else "RGB")
            if opts.size is not None and im.size != (opts.size, opts.size):
                im = im.resize((opts.size, opts.size), Image.Resampling.LANCZOS)
            arr = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{path}: image does not decode ({e})") from None
    return 255 - arr if invert else arr


def _images(files: list[Path]) -> list[Path]:
    return sorted(f for f in files if f.suffix.lower() in IMAGE_SUFFIXES)


def read_omniglot(src: Path, opts: ReadOptions) -> Source:
    """`images_background/<alphabet>/<character>/*.png` -> train/val by alphabet; `images_evaluation` -> test."""
    invert = True if opts.invert is None else opts.invert
    parts = {p: src / p for p in ("images_background", "images_evaluation") if (src / p).is_dir()}
    if not parts:
        raise DataError(f"{src}: expected images_background/ and/or images_evaluation/ (Omniglot's layout)")
    plan: list[tuple[str, str, Split, Path]] = []  # alphabet, character, split, folder
    for part, root in sorted(parts.items()):
        alphabets = sorted(d.name for d in root.iterdir() if d.is_dir())
        if part == "images_evaluation":
            splits = {a: "test" for a in alphabets}
        else:
            groups = {a: [a] for a in alphabets}  # split whole alphabets, not characters
            splits = dict(iter_split_by_group(groups, (1 - opts.val_fraction, opts.val_fraction, 0.0), opts.seed))
        for a in alphabets:
            for ch in sorted(d for d in (root / a).iterdir() if d.is_dir()):
                plan.append((a, ch.name, splits[a], ch))

    def classes() -> Iterator[SourceClass]:
        for a, ch, split, folder in plan:
            files = _images(list(folder.iterdir()))
            imgs = [load_image(f, opts, grey=True, invert=invert) for f in files]
            yield SourceClass(f"{a}/{ch}", a, split, imgs)

    return Source(classes(), len(plan), {"format": "omniglot", "src": str(src), "invert": invert})


def read_imagefolder(src: Path, opts: ReadOptions) -> Source:
    """`<split>/<class>/*` if train/ val/ test/ folders exist (mini-ImageNet, CUB releases), else `<class>/*` with a
    seeded class split by `fractions`."""
    split_dirs = {s: src / s for s in SPLITS if (src / s).is_dir()}
    plan: list[tuple[str, Split, Path]] = []
    if split_dirs:
        for s, root in split_dirs.items():
            plan += [(d.name, s, d) for d in sorted(root.iterdir()) if d.is_dir()]
    else:
        dirs = {d.name: d for d in sorted(src.iterdir()) if d.is_dir()}
        if not dirs:
            raise DataError(f"{src}: expected one folder per class (or train/ val/ test/ folders of class folders)")
        splits = dict(iter_split_by_group({n: [n] for n in dirs}, opts.fractions, opts.seed))
        plan = [(n, splits[n], d) for n, d in dirs.items()]
    names = [n for n, _, _ in plan]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise DataError(f"{src}: class folders {dup[:5]} appear in more than one split")
    grey = None

    def classes() -> Iterator[SourceClass]:
        nonlocal grey
        for name, split, folder in plan:
            files = _images(list(folder.iterdir()))
            if not files:
                raise DataError(f"{folder}: class folder has no images")
            if grey is None:  # the first image decides grey vs RGB for the whole set
                try:
                    with Image.open(files[0]) as im:
                        grey = im.mode in ("1", "L", "LA", "I", "I;16")
                except (UnidentifiedImageError, OSError) as e:
                    raise DataError(f"{files[0]}: image does not decode ({e})") from None
            yield SourceClass(name, name, split, [load_image(f, opts, grey) for f in files])

    return Source(classes(), len(plan), {"format": "imagefolder", "src": str(src)})


def read_numpy(src: Path, opts: ReadOptions) -> Source:
    """An .npz with `images` [N, H, W(, 3)] (uint8, or float in [0, 1]) and `labels` [N] (int); optional per-class
    arrays indexed by label: `splits` ('train'/'val'/'test'), `alphabets`, `class_names`."""
    try:
        z = np.load(src, allow_pickle=False)
        images, labels = z["images"], z["labels"]
        extra = {k: z[k] for k in ("splits", "alphabets", "class_names") if k in z.files}
    except KeyError as e:
        raise DataError(f"{src}: missing array {e} (expected 'images' and 'labels')") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{src}: not a readable .npz ({e})") from None
    if len(images) != len(labels) or images.ndim not in (3, 4):
        raise DataError(f"{src}: images {images.shape} and labels {labels.shape} do not match ([N, H, W(, 3)], [N])")
    if images.dtype != np.uint8:
        if images.min() < 0 or images.max() > 1:
            raise DataError(f"{src}: float images must lie in [0, 1] (got [{images.min()}, {images.max()}])")
        images = np.round(images * 255).astype(np.uint8)
    ids = np.unique(labels)
    n = int(ids.max()) + 1
    for k, v in extra.items():
        if len(v) < n:
            raise DataError(f"{src}: '{k}' has {len(v)} entries, labels go up to {n - 1}")
    names = [str(extra["class_names"][i]) if "class_names" in extra else str(i) for i in ids]
    alphabets = [str(extra["alphabets"][i]) if "alphabets" in extra else names[j] for j, i in enumerate(ids)]
    if "splits" in extra:
        splits = [str(extra["splits"][i]) for i in ids]
        bad = sorted({s for s in splits if s not in SPLITS})
        if bad:
            raise DataError(f"{src}: 'splits' holds {bad}, expected values in {SPLITS}")
    else:
        groups: dict[str, list[str]] = {}
        for name, a in zip(names, alphabets):
            groups.setdefault(a, []).append(name)
        by_group = dict(iter_split_by_group(groups, opts.fractions, opts.seed))
        splits = [by_group[a] for a in alphabets]

    def classes() -> Iterator[SourceClass]:
        for j, i in enumerate(ids):
            imgs = [_resize(im, opts.size) for im in images[labels == i]]
            yield SourceClass(names[j], alphabets[j], splits[j], imgs)

    return Source(classes(), len(ids), {"format": "numpy", "src": str(src)})


def read_digits(src: Path, opts: ReadOptions) -> Source:
    """scikit-learn's bundled handwritten digits (UCI, 1,797 8x8 images, 10 classes): real handwriting, too few
    classes to meta-train on, so every class goes to `test` (a cross-domain check) unless fractions say otherwise."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images / 16.0 * 255).astype(np.uint8)
    fractions = opts.fractions if opts.fractions != ReadOptions().fractions else (0.0, 0.0, 1.0)
    splits = dict(iter_split_by_group({str(i): [str(i)] for i in range(10)}, fractions, opts.seed))
    size = opts.size or 28

    def classes() -> Iterator[SourceClass]:
        for i in range(10):
            yield SourceClass(
                f"digit-{i}", "digits", splits[str(i)], [_resize(im, size) for im in images[d.target == i]]
            )

    return Source(classes(), 10, {"format": "digits", "src": "sklearn.datasets.load_digits"})


def _resize(img: np.ndarray, size: int | None) -> np.ndarray:
    if size is None or img.shape[:2] == (size, size):
        return np.ascontiguousarray(img)
    return np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.LANCZOS), dtype=np.uint8)
