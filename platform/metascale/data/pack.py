"""Writes class-grouped WebDataset tar shards plus index.json, atomically.

The index also carries the train split's per-channel pixel mean and std (data/images.py), summed in the same pass.

Every instance of a class lies in one shard (an episode then touches few shards) and a shard holds classes of one
split only (a train reader never opens a test shard). Shards and index go to `OUT.partial-*` next to OUT; the index
is written last and the directory renamed into place, so a killed pack leaves only a `.partial-*` directory, which
no reader accepts (it has no OUT/index.json).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from metascale.data.images import StatsAccumulator
from metascale.data.index import INDEX_NAME, ClassEntry, ShardEntry, ShardIndex, sample_key
from metascale.data.tasks import SPLITS, Split
from metascale.errors import DataError
from metascale.files import atomic_write, fsync_path, make_temp_dir


@dataclass(frozen=True)
class SourceClass:
    """One class to pack: its images as uint8 arrays [H, W] (grey) or [H, W, 3] (RGB), all the same shape."""

    name: str
    alphabet: str
    split: Split
    images: Sequence[np.ndarray]


def encode_png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


class _ShardWriter:
    """Writes the shards of one split, rolling to a new shard at a class or byte limit."""

    def __init__(self, tmp: Path, split: Split, max_classes: int, max_bytes: int):
        self.tmp, self.split, self.max_classes, self.max_bytes = tmp, split, max_classes, max_bytes
        self.shard_no, self.file, self.writer = 0, None, None
        self.classes = self.samples = 0

    def _open(self) -> None:
        import webdataset as wds

        self.name = f"{self.split}-{self.shard_no:05d}.tar"
        self.file = open(self.tmp / self.name, "wb")
        self.writer = wds.TarWriter(self.file, mtime=0, user="metascale", group="metascale")  # int: no PAX header
        self.classes = self.samples = 0

    def write_class(self, class_id: int, images: Sequence[np.ndarray]) -> tuple[int, ShardEntry | None]:
        """One sample per class: its instances stacked top to bottom in one PNG (one tar member and one decode per
        class, not per image: Python's tarfile and Pillow cost ~0.5 ms per member). Returns (shard position
        within this split, the entry of a shard this write closed or None)."""
        if self.writer is None:
            self._open()
        meta = {"class": class_id, "count": len(images)}
        self.writer.write(
            {
                "__key__": sample_key(class_id),
                "png": encode_png(np.concatenate(images, axis=0)),
                "json": json.dumps(meta).encode(),
            }
        )
        self.classes += 1
        self.samples += len(images)
        position = self.shard_no
        full = self.classes >= self.max_classes or self.file.tell() >= self.max_bytes
        return position, (self.close() if full else None)

    def close(self) -> ShardEntry | None:
        if self.writer is None:
            return None
        self.writer.close()  # closes the file too
        path = self.tmp / self.name
        fsync_path(path)
        entry = ShardEntry(self.name, self.split, _sha256(path), path.stat().st_size, self.samples)
        self.writer, self.shard_no = None, self.shard_no + 1
        return entry


def pack(
    classes: Iterable[SourceClass],
    out: str | Path,
    *,
    source: dict | None = None,
    max_classes_per_shard: int = 64,
    max_shard_bytes: int = 64 << 20,
    overwrite: bool = False,
    progress: bool = True,
    total: int | None = None,
) -> ShardIndex:
    """Packs `classes` into OUT; returns the index. Raises DataError on inconsistent input, and on an OUT that
    cannot be written."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise DataError(f"{out}: already exists (pass --overwrite to replace it)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = make_temp_dir(out.parent, f"{out.name}.partial-")
    except OSError as e:
        raise cannot_create(out, "the packed set", e) from None
    try:
        index = _write_shards(classes, tmp, source or {}, max_classes_per_shard, max_shard_bytes, progress, total)
        atomic_write(tmp / INDEX_NAME, index.to_json().encode())
        _replace_dir(tmp, out)
        return index
    except OSError as e:  # a full disk, or a source folder that cannot be listed: one line, not a traceback
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"{out}: packing failed ({e})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def cannot_create(path: Path, what: str, e: OSError) -> DataError:
    """The one-line error for a folder that cannot be made: names the path in the way when it is a file."""
    blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    why = f"{blocker} is a file, not a folder" if blocker else f"{e.strerror or e}: {e.filename}"
    return DataError(f"{path}: cannot create {what} there ({why})")


def _write_shards(classes, tmp, source, max_classes, max_bytes, progress, total) -> ShardIndex:
    from tqdm import tqdm

    writers = {s: _ShardWriter(tmp, s, max_classes, max_bytes) for s in SPLITS}
    entries: list[tuple[str, str, Split, int, int]] = []  # name, alphabet, split, count, shard-in-split
    closed: dict[Split, list[ShardEntry]] = {s: [] for s in SPLITS}
    shape = None
    stats = StatsAccumulator()  # the train split's per-channel mean/std, in this same pass
    for cid, c in enumerate(tqdm(classes, total=total, desc="pack", unit="class", disable=not progress)):
        if c.split not in SPLITS:
            raise DataError(f"class '{c.name}': split '{c.split}' is not one of {SPLITS}")
        if not len(c.images):
            raise DataError(f"class '{c.name}': no images")
        for img in c.images:
            s = _image_shape(img, c.name)
            if shape is None:
                shape = s
            elif s != shape:
                raise DataError(
                    f"class '{c.name}': image shape {s} differs from the set's {shape} (resize with --size)"
                )
            if c.split == "train":
                stats.add(img)
        position, done = writers[c.split].write_class(cid, c.images)
        closed[c.split] += [done] if done else []
        entries.append((c.name, c.alphabet, c.split, len(c.images), position))
    if shape is None:
        raise DataError("nothing to pack: the source has no classes")
    for s in SPLITS:
        last = writers[s].close()
        closed[s] += [last] if last else []
    shards = [e for s in SPLITS for e in closed[s]]
    base = {s: sum(len(closed[t]) for t in SPLITS[: SPLITS.index(s)]) for s in SPLITS}
    class_entries = [ClassEntry(n, a, sp, k, base[sp] + pos) for n, a, sp, k, pos in entries]
    image = {"channels": shape[0], "height": shape[1], "width": shape[2]}
    index = ShardIndex(image, class_entries, shards, source, stats.result())
    index.check(str(tmp))
    return index


def _image_shape(img: np.ndarray, name: str) -> tuple[int, int, int]:
    if img.dtype != np.uint8 or img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] != 3):
        raise DataError(f"class '{name}': expected uint8 [H, W] or [H, W, 3] images, got {img.dtype} {img.shape}")
    return (1, *img.shape) if img.ndim == 2 else (3, img.shape[0], img.shape[1])


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _replace_dir(tmp: Path, out: Path) -> None:
    """Moves the finished set into place; an existing OUT (only with overwrite) is moved aside first."""
    old = None
    if out.exists():
        old = make_temp_dir(out.parent, f"{out.name}.old-")
        os.replace(out, old / out.name)
    os.replace(tmp, out)
    fsync_path(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def iter_split_by_group(
    groups: dict[str, list[str]], fractions: tuple[float, float, float], seed: int
) -> Iterator[tuple[str, Split]]:
    """Assigns whole groups (alphabets, or single classes) to splits by a seeded shuffle, filling train, val and
    test to the given fractions of the class count; yields (group, split)."""
    names = sorted(groups)
    order = np.random.default_rng(seed).permutation(len(names))
    total = sum(len(v) for v in groups.values())
    bounds = np.cumsum(fractions) / sum(fractions) * total
    seen = 0
    for i in order:
        g = names[i]
        # A group goes to the split whose quota its midpoint falls in, so splits meet their fractions on average.
        mid = seen + len(groups[g]) / 2
        split = SPLITS[min(int(np.searchsorted(bounds, mid, side="right")), 2)]
        seen += len(groups[g])
        yield g, split
