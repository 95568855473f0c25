"""The index of a task-shard set: which classes exist, in which split and shard, and each shard's checksum.

Readers plan episodes from the index alone (no shard is opened to decide which classes an episode uses), so the
index is the contract between `metascale data pack` and the sampler. It is written last, atomically: a set without
an index.json is incomplete and no reader accepts it.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from metascale.data.tasks import SPLITS, Split
from metascale.data.urls import read_bytes
from metascale.errors import DataError

FORMAT = "metascale-task-shards"
VERSION = 2  # 2: one sample per class (1 had one per image)
INDEX_NAME = "index.json"
# A shard's name is joined onto the set's root and substituted into `pipe:` commands: a plain file name only (no
# path separator, nothing a shell or a command's option parser would read as syntax).
SHARD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")


@dataclass(frozen=True)
class ClassEntry:
    name: str
    alphabet: str  # the group that splits are made by (Omniglot's alphabets); the class name where none exists
    split: Split
    count: int  # instances
    shard: int  # position in ShardIndex.shards


@dataclass(frozen=True)
class ShardEntry:
    name: str  # file name relative to the set's root
    split: Split
    sha256: str
    bytes: int
    samples: int  # images (instances of all its classes)


@dataclass(frozen=True)
class ShardIndex:
    """Class ids are positions in `classes`. A shard sample is one class: key `c{class:06d}`, `png` (the instances
    stacked top to bottom, count x height rows) and `json` ({"class": id, "count": n})."""

    image: dict[str, int]  # channels, height, width (every image in the set has this shape)
    classes: list[ClassEntry]
    shards: list[ShardEntry]
    source: dict[str, Any] = field(default_factory=dict)
    # The train split's per-channel pixel mean and std in [0, 1] units ({"mean": [...], "std": [...], "images": n}),
    # computed at pack time (data/images.py); None for sets packed before, or without a train split.
    stats: dict[str, Any] | None = None

    def split_classes(self, split: Split) -> list[int]:
        return [i for i, c in enumerate(self.classes) if c.split == split]

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.image["channels"], self.image["height"], self.image["width"]

    def to_json(self) -> str:
        doc = {
            "format": FORMAT,
            "version": VERSION,
            "image": self.image,
            "source": self.source,
            "classes": [asdict(c) for c in self.classes],
            "shards": [asdict(s) for s in self.shards],
        }
        if self.stats is not None:  # an optional field: readers before it ignore it, so the version stays
            doc["stats"] = self.stats
        return json.dumps(doc, indent=1, ensure_ascii=False)

    @staticmethod
    def from_json(text: str | bytes, where: str) -> "ShardIndex":
        try:
            doc = json.loads(text)
        except ValueError as e:
            raise DataError(f"{where}: index is not valid JSON ({e})") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise DataError(f"{where}: not a metascale task-shard index (expected format '{FORMAT}')")
        if doc.get("version") != VERSION:
            raise DataError(f"{where}: index version {doc.get('version')!r}, this metascale reads version {VERSION}")
        try:
            index = ShardIndex(
                image={k: int(doc["image"][k]) for k in ("channels", "height", "width")},
                classes=[ClassEntry(**c) for c in doc["classes"]],
                shards=[ShardEntry(**s) for s in doc["shards"]],
                source=doc.get("source", {}),
                stats=doc.get("stats"),
            )
        except (KeyError, TypeError) as e:
            raise DataError(f"{where}: index is missing or has a malformed field ({e})") from None
        index.check(where)
        return index

    def check(self, where: str) -> None:
        """Internal consistency: shard names plain, splits known, each class in a shard of its own split, counts
        add up."""
        for i, s in enumerate(self.shards):
            if not isinstance(s.name, str) or not SHARD_NAME.fullmatch(s.name):
                raise DataError(
                    f"{where}: shard {i} is named {s.name!r}, not a plain file name (letters, digits, "
                    f"'.', '_' and '-', starting with a letter or digit)"
                )
        per_shard = [0] * len(self.shards)
        for i, c in enumerate(self.classes):
            if c.split not in SPLITS:
                raise DataError(f"{where}: class {i} '{c.name}' has split '{c.split}', expected one of {SPLITS}")
            if not 0 <= c.shard < len(self.shards):
                raise DataError(f"{where}: class {i} '{c.name}' names shard {c.shard}, index has {len(self.shards)}")
            if self.shards[c.shard].split != c.split:
                raise DataError(
                    f"{where}: class {i} '{c.name}' ({c.split}) lies in a {self.shards[c.shard].split} shard"
                )
            per_shard[c.shard] += c.count
        for s, n in zip(self.shards, per_shard):
            if s.samples != n:
                raise DataError(f"{where}: shard {s.name} lists {s.samples} samples, its classes count {n}")
        if self.stats is not None:
            st, c = self.stats, self.image["channels"]
            ok = isinstance(st, dict) and all(isinstance(st.get(k), list) and len(st[k]) == c for k in ("mean", "std"))
            if not ok or not all(isinstance(v, (int, float)) and v >= 0 for v in st["mean"] + st["std"]):
                raise DataError(
                    f"{where}: stats must hold 'mean' and 'std', {c} non-negative numbers each (got {st!r})"
                )


def sample_key(class_id: int) -> str:
    return f"c{class_id:06d}"


def load_index(root: str) -> ShardIndex:
    from metascale.data.urls import join

    where = join(root, INDEX_NAME)
    try:
        raw = read_bytes(where)
    except FileNotFoundError:
        raise DataError(f"{where}: no index (not a packed set, or a pack that did not finish)") from None
    except OSError as e:
        raise DataError(f"{where}: the index cannot be read ({e})") from None
    return ShardIndex.from_json(raw, where)
