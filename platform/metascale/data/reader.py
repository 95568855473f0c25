"""Streams class records out of task shards with WebDataset, checking everything against the index.

A record is every instance of one class (one shard sample), decoded to uint8 [n, C, H, W]. A shard's records are released only after
the shard's bytes matched the index's sha256 and its classes' counts matched, so a truncated, corrupt or swapped
shard never feeds an episode. Bad data raises DataError naming the shard and sample, or, with
`on_bad_sample='skip'`, is counted in `ReadStats` and left out (a shard failing its checksum is left out whole).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from dataclasses import dataclass, field
from itertools import islice
from typing import Callable, Iterable, Iterator, Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from metascale.data.index import ShardIndex
from metascale.data.tasks import Split
from metascale.data.urls import join, open_stream
from metascale.errors import DataError

OnBad = Literal["error", "skip"]
_KEY = re.compile(r"^c(\d{6})$")


@dataclass(frozen=True)
class ClassRecord:
    class_id: int
    images: np.ndarray  # uint8 [n, C, H, W]
    shard: str


@dataclass
class ReadStats:
    """What `skip` left out; `problems` keeps the first messages for the log."""

    skipped_samples: int = 0
    skipped_shards: int = 0
    problems: list[str] = field(default_factory=list)

    def add(self, message: str, samples: int = 1, shard: bool = False) -> None:
        self.skipped_samples += samples
        self.skipped_shards += int(shard)
        if len(self.problems) < 20:
            self.problems.append(message)

    def merge(self, other: "ReadStats") -> None:
        self.skipped_samples += other.skipped_samples
        self.skipped_shards += other.skipped_shards
        self.problems += other.problems[: max(0, 20 - len(self.problems))]


def node_splitter(rank: int, world: int) -> Callable[[Iterable], Iterator]:
    """Shard i goes to rank i % world (explicit: WebDataset's default raises when WORLD_SIZE > 1)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside world of {world}")
    return lambda src: islice(src, rank, None, world)


def worker_splitter(worker: int | None = None, workers: int | None = None) -> Callable[[Iterable], Iterator]:
    """Within a rank, shard j goes to loader worker j % workers (the DataLoader's worker info when not given)."""

    def split(src: Iterable) -> Iterator:
        w, n = worker, workers
        if w is None:
            import torch.utils.data

            info = torch.utils.data.get_worker_info()
            w, n = (info.id, info.num_workers) if info is not None else (0, 1)
        return islice(src, w, None, n)

    return split


def shard_stream(
    root: str, names: list[str], rank: int = 0, world: int = 1, worker: int | None = None, workers: int | None = None
) -> Iterator[dict]:
    """The WebDataset shard list of this reader: dicts with `url`, after the node and worker splits."""
    import webdataset as wds

    urls = [join(root, n) for n in names]
    return iter(
        wds.DataPipeline(wds.SimpleShardList(urls), node_splitter(rank, world), worker_splitter(worker, workers))
    )


class _HashingReader(io.RawIOBase):
    """Hashes every byte tarfile reads, so the checksum costs no second pass over the shard."""

    def __init__(self, raw):
        self.raw, self.sha, self.n = raw, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.raw.read(len(b))
        self.sha.update(data)
        self.n += len(data)
        b[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self.raw.close()
        super().close()


def read_records(
    index: ShardIndex, root: str, shards: Iterable[dict], on_bad: OnBad = "error", stats: ReadStats | None = None
) -> Iterator[ClassRecord]:
    """Decodes the given shards (dicts with `url`, as `shard_stream` yields) into class records."""
    stats = stats if stats is not None else ReadStats()
    by_name = {s.name: i for i, s in enumerate(index.shards)}
    for item in shards:
        url = item["url"]
        name = url.rsplit("/", 1)[-1] if not url.startswith("pipe:") else _pipe_name(url, index)
        if name not in by_name:
            raise DataError(f"shard {url}: not listed in the index")
        local = ReadStats()  # merged only if the shard as a whole is kept (a dropped shard counts once)
        try:
            records = _read_shard(index, by_name[name], url, on_bad, local)
        except _ShardBad as e:
            if on_bad == "error":
                raise DataError(str(e)) from None
            stats.add(str(e), samples=index.shards[by_name[name]].samples, shard=True)
            continue
        stats.merge(local)
        yield from records


class _ShardBad(Exception):
    """The shard as a whole cannot be trusted (truncated, corrupt, or not what the index says)."""


def _read_shard(index: ShardIndex, shard_no: int, url: str, on_bad: OnBad, stats: ReadStats) -> list[ClassRecord]:
    from webdataset.tariterators import tar_file_iterator

    entry = index.shards[shard_no]
    expected = {i: c.count for i, c in enumerate(index.classes) if c.shard == shard_no}
    found: dict[int, np.ndarray] = {}
    try:
        raw = open_stream(url)
    except (FileNotFoundError, OSError) as e:
        raise _ShardBad(f"shard {url}: cannot be opened ({e})") from None
    reader = _HashingReader(raw)
    last, first_bad = "(start of shard)", ""
    try:
        buffered = io.BufferedReader(reader, 1 << 16)  # kept: collecting it would close `reader`
        for key, fields in _group(tar_file_iterator(buffered)):
            last = key
            try:
                cid, imgs = _decode(index, key, fields, expected, found)
            except _SampleBad as e:
                msg = f"shard {url} sample {key}: {e}"
                if on_bad == "error":  # raised after the checksum, which tells a truncated shard from a bad sample
                    first_bad = first_bad or msg
                    continue
                m = _KEY.match(key)
                stats.add(msg, samples=expected.get(int(m.group(1)), 1) if m else 1)
                continue
            found[cid] = imgs
        while buffered.read(1 << 20):  # tarfile stops at the end marker; hash the padding too
            pass
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        raise _ShardBad(
            f"shard {url}: truncated or corrupt tar after sample {last} ({type(e).__name__}: {e})"
        ) from None
    finally:
        reader.close()
    if reader.sha.hexdigest() != entry.sha256:
        also = f"; first bad sample: {first_bad.split(': ', 1)[1]}" if first_bad else ""
        raise _ShardBad(
            f"shard {url}: sha256 {reader.sha.hexdigest()[:12]}... does not match the index's "
            f"{entry.sha256[:12]}... ({reader.n} bytes read, index says {entry.bytes}: truncated, corrupt "
            f"or replaced{also})"
        )
    if first_bad:
        raise DataError(first_bad)
    missing = [i for i in expected if i not in found]
    if missing and on_bad == "error":
        i = missing[0]
        raise DataError(
            f"shard {url}: class {i} '{index.classes[i].name}' is in the index but not in the shard "
            f"({len(missing)} such classes)"
        )
    return [ClassRecord(cid, imgs, entry.name) for cid, imgs in sorted(found.items())]


class _SampleBad(Exception):
    pass


def _group(files: Iterable[dict]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Files `KEY.ext` -> (KEY, {ext: bytes}); a shard's samples are contiguous (TarWriter writes them so)."""
    key, fields = None, {}
    for f in files:
        k, _, ext = f["fname"].rpartition("/")[2].partition(".")
        if k != key:
            if key is not None:
                yield key, fields
            key, fields = k, {}
        fields[ext] = f["data"]
    if key is not None:
        yield key, fields


def _decode(index: ShardIndex, key: str, fields: dict[str, bytes], expected: dict[int, int], found: dict):
    """A class sample -> (class id, uint8 [count, C, H, W]), or _SampleBad saying what is wrong."""
    m = _KEY.match(key)
    if not m:
        raise _SampleBad("key is not of the form c<class, 6 digits>")
    cid = int(m.group(1))
    if cid not in expected:
        raise _SampleBad(f"class {cid} does not belong to this shard in the index")
    if cid in found:
        raise _SampleBad(f"class {cid} appears twice")
    missing = [f for f in ("png", "json") if f not in fields]
    if missing:
        raise _SampleBad(f"missing field {missing} (has {sorted(fields)})")
    try:
        meta = json.loads(fields["json"])
        if meta["class"] != cid or meta["count"] != expected[cid]:
            raise _SampleBad(
                f"json says class {meta['class']} with {meta['count']} instances, the key and index say "
                f"class {cid} with {expected[cid]}"
            )
    except (ValueError, KeyError, TypeError) as e:
        raise _SampleBad(f"json field is malformed ({e})") from None
    c, h, w = index.shape
    try:
        with Image.open(io.BytesIO(fields["png"])) as im:
            im.load()
            arr = np.asarray(im.convert("L" if c == 1 else "RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise _SampleBad(f"image does not decode ({e})") from None
    n = expected[cid]
    if arr.shape[:2] != (n * h, w):
        raise _SampleBad(f"image is {arr.shape[1]}x{arr.shape[0]}, expected {w}x{n * h} ({n} instances of {w}x{h})")
    arr = arr.reshape(n, h, w, -1).transpose(0, 3, 1, 2)
    return cid, np.ascontiguousarray(arr)


def _pipe_name(url: str, index: ShardIndex) -> str:
    for s in index.shards:
        if s.name in url:
            return s.name
    raise DataError(f"shard {url}: names no shard of the index")


def split_shards(index: ShardIndex, split: Split) -> list[str]:
    return [s.name for s in index.shards if s.split == split]
