"""The class index of a per-sample WebDataset set (`data: {source: shards, layout: samples}`).

Other tools (webdataset's ShardWriter, `tar`) write one sample per image: members `KEY.jpg` (or png, webp, ...) and
`KEY.cls` (the integer class) next to each other. Episodes need the opposite view, class -> its examples, so one
pass over the shards records, per class, every example's (shard, data offset, size, key) and each image's size; no
image is decoded. The index is written atomically beside a local set (`metascale-index.json`) or, for a remote one,
to a local cache file, and reused while every shard still has the size and mtime (local) or ETag (remote) it had.
Splits are by class, as few-shot sets are distributed: each split has its own shards (`train-*.tar`, `val-*.tar`,
`test-*.tar` by default), and a class label found in two splits' shards is an error.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from metascale.data.index import ClassEntry, ShardEntry, ShardIndex
from metascale.data.tasks import SPLITS, Split
from metascale.data.urls import join, open_stream
from metascale.errors import DataError

FORMAT = "metascale-sample-index"
VERSION = 1
INDEX_NAME = "metascale-index.json"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "pgm", "bmp", "tif", "tiff")
_GREY = {"L", "1", "I", "I;16", "F", "LA"}


@dataclass(frozen=True)
class SampleIndex:
    """Class ids are positions in `labels` (sorted .cls values); `members[cid]` are that class's examples as
    [shard, data offset, size, key], in shard then tar order."""

    url: str
    image: dict[str, int]  # channels, height, width
    shards: list[dict]  # name, split, bytes, stamp
    labels: list[int]
    splits: list[Split]  # per class
    members: list[list[list]]

    def to_json(self) -> str:
        doc = {
            "format": FORMAT,
            "version": VERSION,
            "url": self.url,
            "image": self.image,
            "shards": self.shards,
            "classes": [
                {"label": lab, "split": sp, "members": m} for lab, sp, m in zip(self.labels, self.splits, self.members)
            ],
        }
        return json.dumps(doc, separators=(",", ":"))

    @staticmethod
    def from_json(text: str | bytes, where: str) -> "SampleIndex":
        try:
            doc = json.loads(text)
            if doc.get("format") != FORMAT or doc.get("version") != VERSION:
                raise DataError(f"{where}: not a version-{VERSION} metascale sample index; delete it to rebuild")
            cls = doc["classes"]
            return SampleIndex(
                doc["url"],
                doc["image"],
                doc["shards"],
                [int(c["label"]) for c in cls],
                [c["split"] for c in cls],
                [c["members"] for c in cls],
            )
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise DataError(f"{where}: sample index is malformed ({e}); delete it to rebuild") from None

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.image["channels"], self.image["height"], self.image["width"]

    def planner_view(self) -> ShardIndex:
        """The index as the episode planner reads it (class ids, splits, counts, names): a class's `shard` is the
        one holding its first example, used only in messages."""
        shards = [ShardEntry(s["name"], s["split"], "", s["bytes"], 0) for s in self.shards]
        classes = [
            ClassEntry(str(lab), str(lab), sp, len(m), m[0][0])
            for lab, sp, m in zip(self.labels, self.splits, self.members)
        ]
        return ShardIndex(self.image, classes, shards, {"layout": "samples", "url": self.url})


def index_path(url: str, index: str | None) -> str:
    """Where the index lives: `index` if given, beside a local set, else a cache file named by the URL's hash."""
    if index:
        return index
    if "://" not in url or url.startswith("file://"):
        return str(Path(url.removeprefix("file://")) / INDEX_NAME)
    digest = hashlib.sha256(url.encode()).hexdigest()[:20]
    return str(Path.home() / ".cache" / "metascale" / "indexes" / f"{digest}.json")


def load_sample_index(url: str, splits: dict[str, str], index: str | None = None) -> SampleIndex:
    """The stored index if it is for these shards and none changed since; else one pass over the shards, stored."""
    shards = list_shards(url, splits)
    where = index_path(url, index)
    try:
        stored = SampleIndex.from_json(Path(where).read_bytes(), where)
        if stored.url == url and [(s["name"], s["split"], s["stamp"]) for s in stored.shards] == shards:
            return stored
    except FileNotFoundError:
        pass
    except DataError:
        pass  # an old or damaged index is rebuilt, not trusted
    built = build_index(url, shards)
    from metascale.files import atomic_write

    try:
        Path(where).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(where, built.to_json().encode())
    except OSError as e:
        raise DataError(
            f"{where}: cannot store the sample index ({e.strerror or e}); set data.index to a writable file"
        ) from None
    return built


def list_shards(url: str, splits: dict[str, str]) -> list[tuple[str, Split, str]]:
    """(name relative to url, split, stamp) of every shard, splits in order, names sorted within a split."""
    from braceexpand import braceexpand

    fs, base = _fs(url)
    out: list[tuple[str, Split, str]] = []
    for split in SPLITS:
        if split not in splits:
            continue
        names: list[str] = []
        for pattern in braceexpand(splits[split]):
            if pattern.startswith("/") or ".." in pattern.split("/"):
                raise DataError(f"data.splits.{split}: '{pattern}' must be relative to data.url, without '..'")
            if any(ch in pattern for ch in "*?["):
                found = fs.glob(base.rstrip("/") + "/" + pattern)
                names += [p[len(base.rstrip("/")) + 1 :] for p in found]
            else:
                names.append(pattern)
        for name in sorted(set(names)):
            out.append((name, split, _stamp(fs, base.rstrip("/") + "/" + name, join(url, name))))
    if not out:
        raise DataError(f"{url}: no shards match data.splits {splits}")
    return out


def _fs(url: str):
    from fsspec.core import url_to_fs

    return url_to_fs(url if "://" in url else os.path.abspath(url))


def _stamp(fs, path: str, url: str) -> str:
    """What changes when the shard does: size and mtime locally, the ETag (or last-modified) remotely."""
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise DataError(f"shard {url}: not found") from None
    except OSError as e:
        raise DataError(f"shard {url}: cannot be listed ({e})") from None
    if "://" not in url or url.startswith("file://"):
        st = os.stat(path)
        return f"{st.st_size}:{st.st_mtime_ns}"
    tag = next((info[k] for k in ("ETag", "etag", "LastModified", "last_modified", "mtime") if info.get(k)), "")
    return f"{info.get('size')}:{tag}"


def build_index(url: str, shards: list[tuple[str, Split, str]]) -> SampleIndex:
    """One streaming pass over the shards: members and class labels, no image decoded (headers only)."""
    by_label: dict[int, list[list]] = {}
    split_of: dict[int, tuple[Split, str]] = {}
    shapes: dict[tuple[int, int], str] = {}
    grey = True
    entries = []
    for no, (name, split, stamp) in enumerate(shards):
        shard_url = join(url, name)
        for key, fields in _samples(shard_url):
            where = f"shard {shard_url} sample {key}"
            if "cls" not in fields:
                raise DataError(f"{where}: no .cls member (has {sorted(fields)})")
            ext = next((e for e in IMAGE_EXTS if e in fields), None)
            if ext is None:
                raise DataError(f"{where}: no image member (.{', .'.join(IMAGE_EXTS)}); has {sorted(fields)}")
            label = _label(fields["cls"][2], where)
            offset, n, data = fields[ext]
            try:
                with Image.open(io.BytesIO(data)) as im:
                    wh, mode = im.size, im.mode
            except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
                raise DataError(f"{where}: .{ext} is not a readable image ({e})") from None
            shapes.setdefault(wh, f"{key}.{ext}")
            if len(shapes) > 1:
                (a, ka), (b, kb) = list(shapes.items())[:2]
                raise DataError(
                    f"{where}: images differ in size ({ka} is {a[0]}x{a[1]}, {kb} is {b[0]}x{b[1]}); "
                    f"write the set at one size"
                )
            grey = grey and mode in _GREY
            first = split_of.setdefault(label, (split, name))
            if first[0] != split:
                raise DataError(
                    f"{where}: class {label} is in split '{split}' and in split '{first[0]}' "
                    f"(shard {first[1]}); splits must hold disjoint classes"
                )
            by_label.setdefault(label, []).append([no, offset, n, key])
        size = stamp.split(":", 1)[0]
        entries.append({"name": name, "split": split, "bytes": int(size) if size.isdigit() else 0, "stamp": stamp})
    if not by_label:
        raise DataError(f"{url}: the shards hold no samples")
    ((w, h),) = shapes
    labels = sorted(by_label)
    return SampleIndex(
        url,
        {"channels": 1 if grey else 3, "height": h, "width": w},
        entries,
        labels,
        [split_of[lab][0] for lab in labels],
        [by_label[lab] for lab in labels],
    )


def _label(raw: bytes, where: str) -> int:
    text = raw.decode("utf-8", "replace").strip()
    try:
        label = int(text)
    except ValueError:
        raise DataError(f"{where}: .cls is {text[:40]!r}, not an integer class") from None
    if label < 0:
        raise DataError(f"{where}: .cls is {label}, a class must be >= 0")
    return label


def _samples(url: str):
    """(key, {ext: (data offset, size, bytes)}) per sample, as webdataset groups members (key = name up to the
    first '.' of the file name)."""
    try:
        raw = open_stream(url)
    except (FileNotFoundError, OSError) as e:
        raise DataError(f"shard {url}: cannot be opened ({e})") from None
    key, fields, last = None, {}, "(start of shard)"
    try:
        with raw, tarfile.open(fileobj=raw, mode="r|") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                head, _, base = m.name.rpartition("/")
                stem, _, ext = base.partition(".")
                k = f"{head}/{stem}" if head else stem
                if k != key:
                    if key is not None:
                        yield key, fields
                    key, fields = k, {}
                last = m.name
                fields[ext.lower()] = (m.offset_data, m.size, tf.extractfile(m).read())
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"shard {url}: truncated or corrupt tar after {last} ({type(e).__name__}: {e})") from None
    if key is not None:
        yield key, fields
