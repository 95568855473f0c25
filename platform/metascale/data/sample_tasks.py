"""Episodes from a per-sample WebDataset set: planned from the class index, then only the planned members read.

The planner is the per-class layout's `EpisodePlanner` over the index's class counts, so an episode is the same pure
function of (seed, split, step, slot). Members are read by byte range: `os.pread` at the tar data offset for a
local shard, a ranged GET (fsspec `cat_file(start, end)`) for s3:// or http(s)://. Nothing is cached beyond open
file handles, so memory stays flat whatever the set's size; the measured cost is in docs/benchmarks.md.
"""

from __future__ import annotations

import io
import os
from typing import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from metascale.config import ShardsData
from metascale.data.episodes import EpisodePlanner, Uint8Episodes, assemble, examples_needed
from metascale.data.samples import SampleIndex, load_sample_index
from metascale.data.tasks import Split, TaskBatch, TaskList
from metascale.data.urls import join
from metascale.errors import DataError


class SampleTasks(Uint8Episodes):
    """The TaskSource of `layout: samples`: the index loads (or is built) on first use, once per process."""

    def __init__(self, spec: ShardsData, split: Split, seed: int):
        self.spec, self.split, self.seed = spec, split, seed
        self._state: tuple[SampleIndex, EpisodePlanner] | None = None
        self._files: dict[int, int] = {}  # shard -> open fd (local shards)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_state": None, "_files": {}}

    def __del__(self):
        for fd in getattr(self, "_files", {}).values():
            os.close(fd)

    @property
    def index(self) -> SampleIndex:
        return self._loaded()[0]

    @property
    def planner(self) -> EpisodePlanner:
        return self._loaded()[1]

    def _loaded(self) -> tuple[SampleIndex, EpisodePlanner]:
        if self._state is None:
            s = self.spec
            index = load_sample_index(s.url, s.splits, s.index)
            counts = {i: len(m) for i, m in enumerate(index.members)}
            planner = EpisodePlanner(index.planner_view(), self.split, counts, examples_needed(s), s.augment, self.seed)
            self._state = (index, planner)
        return self._state

    def image_stats(self) -> dict | None:
        return None  # per-sample sets from other tools carry no pack-time stats: read in [0, 1]

    def batch_uint8(self, step: int, slots: Sequence[int]) -> TaskBatch | TaskList:
        s = self.spec
        index, planner = self._loaded()
        if s.variable:
            from metascale.data.sampler import variable_uint8

            return variable_uint8(
                planner,
                step,
                slots,
                s.sampler,
                lambda cid, instances: self.read(np.array([[cid]]), instances[None, None])[0, 0],
            )
        plans = [planner.plan(step, slot, s.ways, s.shots + s.queries) for slot in slots]
        cids = np.array([[p.class_id for p in plan] for plan in plans])[:, :, None]  # [T, ways, 1]
        return assemble(s, plans, lambda instances: self.read(cids, instances))

    def read(self, cids: np.ndarray, instances: np.ndarray) -> np.ndarray:
        """The images of examples `instances` [T, ways, k] of classes `cids` [T, ways, 1], as uint8
        [T, ways, k, C, H, W]; members are read in (shard, offset) order."""
        index = self.index
        c, h, w = index.shape
        flat_c = np.broadcast_to(cids, instances.shape).ravel()
        members = [index.members[int(ci)][int(i)] for ci, i in zip(flat_c, instances.ravel())]
        out = np.empty((len(members), c, h, w), np.uint8)
        for j in sorted(range(len(members)), key=lambda j: (members[j][0], members[j][1])):
            out[j] = self._decode(members[j], (c, h, w))
        return out.reshape(*instances.shape, c, h, w)

    def _decode(self, member: list, shape: tuple[int, int, int]) -> np.ndarray:
        shard, offset, size, key = member
        data = self._bytes(shard, offset, size)
        c, h, w = shape
        try:
            with Image.open(io.BytesIO(data)) as im:
                arr = np.asarray(im.convert("L" if c == 1 else "RGB"), dtype=np.uint8)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            raise DataError(f"shard {self._url(shard)} sample {key}: image does not decode ({e})") from None
        if arr.shape[:2] != (h, w):
            raise DataError(
                f"shard {self._url(shard)} sample {key}: image is {arr.shape[1]}x{arr.shape[0]}, the "
                f"index says {w}x{h} (shard changed since indexing?)"
            )
        return arr.reshape(h, w, c).transpose(2, 0, 1)

    def _url(self, shard: int) -> str:
        return join(self.spec.url, self.index.shards[shard]["name"])

    def _bytes(self, shard: int, offset: int, size: int) -> bytes:
        url = self._url(shard)
        try:
            if "://" not in url or url.startswith("file://"):
                fd = self._files.get(shard)
                if fd is None:
                    fd = self._files[shard] = os.open(url.removeprefix("file://"), os.O_RDONLY | os.O_CLOEXEC)
                data = os.pread(fd, size, offset)
            else:
                from fsspec.core import url_to_fs

                fs, path = url_to_fs(url)
                data = fs.cat_file(path, start=offset, end=offset + size)
        except OSError as e:
            raise DataError(f"shard {url}: cannot be read ({e})") from None
        if len(data) > size:
            raise DataError(f"shard {url}: the server ignored the byte range (sent {len(data)} bytes for {size})")
        if len(data) != size:
            raise DataError(
                f"shard {url}: {len(data)} bytes at offset {offset}, expected {size} (shard changed "
                f"or truncated since indexing; its index is rebuilt on the next start)"
            )
        return data
