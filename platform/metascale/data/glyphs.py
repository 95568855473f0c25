"""The offline glyph set: Omniglot-like hand-drawn characters that metascale renders itself from pen strokes.

Each character (strokes.py: Hershey fonts, KanjiVG kana and kanji) is a class; each instance is drawn as a different
drawer would: the stroke polylines go through a random affine map (rotation, anisotropic scale, shear, shift), a
smooth polynomial warp, a per-stroke shift, a small per-vertex tremor, and a random pen width; then they are drawn
4x (28 px) or 2x (84 px) oversampled with Pillow and box-reduced. Every random number comes from a generator seeded
by (seed, class name, instance) and the geometry uses only IEEE-exact arithmetic (+, *, and Python's math.sin/cos
once per instance), so the same Pillow release gives the same bytes on every machine (tests pin a checksum).
"""

from __future__ import annotations

import fcntl
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

from metascale.data.index import INDEX_NAME
from metascale.data.pack import SourceClass, cannot_create, iter_split_by_group, pack
from metascale.data.strokes import Glyph, hershey_glyphs, kanjivg_glyphs

RENDER_VERSION = 2  # bump when the rendering changes: the prepared set's folder name carries it
SPLIT_FRACTIONS = (0.7, 0.1, 0.2)  # of classes, whole alphabets to a split (Omniglot style)
MAX_PER_ALPHABET = 55  # Omniglot's largest alphabet has 55 characters
DUPLICATE_COSINE = 0.9  # a glyph this close to a kept one (e.g. 'O' and 'o' once fitted to the box) is dropped


@dataclass(frozen=True)
class GlyphSetSpec:
    image_size: int = 28
    classes: int = 1623  # Omniglot's count
    instances: int = 20  # Omniglot's drawers per character
    seed: int = 0

    @property
    def folder(self) -> str:
        return f"glyphs-v{RENDER_VERSION}-{self.image_size}px-{self.classes}c-{self.instances}i-s{self.seed}"


def catalog(classes: int) -> list[Glyph]:
    """The first `classes` distinct glyphs: Hershey alphabets, then kana, then kanji radicals (strokes.py order)."""
    kept: list[Glyph] = []
    canon = np.zeros((classes, 28 * 28), np.int64)  # undistorted renders of the kept glyphs
    _add_distinct(_capped(hershey_glyphs()), kept, canon)
    need = classes - len(kept)  # kanji are rarely near-duplicates: ask for a little more than the remainder
    if need > 0:
        _add_distinct(kanjivg_glyphs(MAX_PER_ALPHABET, max_total=need + need // 10 + 10), kept, canon)
    return kept


def _add_distinct(candidates: list[Glyph], kept: list[Glyph], canon: np.ndarray) -> None:
    """Greedy: a candidate is kept unless the cosine of its undistorted render with a kept one reaches
    DUPLICATE_COSINE. Integer arithmetic, so the decision is exact on every machine."""
    sq_norms = (canon[: len(kept)] ** 2).sum(1)
    num, den = round(DUPLICATE_COSINE**2 * 10000), 10000
    for g in candidates:
        if len(kept) >= len(canon):
            return
        vec = render(g, None, 28)[0].ravel().astype(np.int64)
        dots = canon[: len(kept)] @ vec
        vv = int(vec @ vec)
        if vv and not np.any((dots > 0) & (dots * dots * den >= num * sq_norms * vv)):
            canon[len(kept)] = vec
            sq_norms = np.append(sq_norms, vv)
            kept.append(g)


def _capped(glyphs: list[Glyph]) -> list[Glyph]:
    seen: dict[str, int] = {}
    out = []
    for g in glyphs:
        seen[g.alphabet] = seen.get(g.alphabet, 0) + 1
        if seen[g.alphabet] <= MAX_PER_ALPHABET:
            out.append(g)
    return out


def class_rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(name.encode())]))


@dataclass(frozen=True)
class _Prepared:
    """A glyph's points as one array (jitter runs on all instances at once) and where its pen must be rounded."""

    points: np.ndarray  # [P, 2], strokes concatenated
    stroke_of: np.ndarray  # [P] stroke id per point
    bounds: list[tuple[int, int]]  # [start, end) per stroke
    dots: np.ndarray  # indices of stroke ends and sharp corners (drawn as discs so thick lines join cleanly)


def _prepare(glyph: Glyph) -> _Prepared:
    points = np.concatenate(glyph.strokes)
    sizes = [len(st) for st in glyph.strokes]
    starts = np.cumsum([0] + sizes[:-1])
    dots = []
    for st, start in zip(glyph.strokes, starts):
        d = np.diff(st, axis=0)
        d1, d2 = d[:-1], d[1:]
        cos = (d1 * d2).sum(1) / (np.linalg.norm(d1, axis=1) * np.linalg.norm(d2, axis=1) + 1e-12)
        dots += [start, start + len(st) - 1] + list(start + 1 + np.nonzero(cos < 0.9)[0])
    stroke_of = np.repeat(np.arange(len(sizes)), sizes)
    return _Prepared(points, stroke_of, [(int(a), int(a + n)) for a, n in zip(starts, sizes)], np.array(dots))


def jitter(glyph: Glyph, rng: np.random.Generator, instances: int) -> tuple[np.ndarray, np.ndarray, _Prepared]:
    """Points [instances, P, 2] as `instances` drawers would make them, and pen widths (fraction of the side).
    Only elementwise +, * (no BLAS, no vectorised transcendental functions), so results are the same everywhere."""
    g = _prepare(glyph)
    n_strokes = len(g.bounds)
    theta = rng.uniform(-0.15, 0.15, instances)
    shear = rng.uniform(-0.15, 0.15, instances)
    scale = rng.uniform(0.82, 1.05, (instances, 1)) * (1 + rng.uniform(-0.06, 0.06, (instances, 2)))
    shift = rng.uniform(-0.05, 0.05, (instances, 2))
    warp = rng.normal(0, 0.12, (instances, 7, 2))
    stroke_shift = rng.normal(0, 0.012, (instances, n_strokes, 2))
    tremor = rng.normal(0, 0.003, (instances, len(g.points), 2))
    width = rng.uniform(0.05, 0.09, instances)
    u, v = g.points[:, 0] - 0.5, g.points[:, 1] - 0.5
    basis = [u * u, u * v, v * v, u * u * u, u * u * v, u * v * v, v * v * v]
    x, y = u[None, :] + 0.0, v[None, :] + 0.0
    for k, b in enumerate(basis):  # smooth warp: a random cubic displacement field
        x = x + b[None, :] * warp[:, k, 0:1]
        y = y + b[None, :] * warp[:, k, 1:2]
    cos = np.array([math.cos(t) for t in theta])[:, None]
    sin = np.array([math.sin(t) for t in theta])[:, None]
    sx, sy, sh = scale[:, 0:1], scale[:, 1:2], shear[:, None]
    # [[c, -s], [s, c]] @ [[1, sh], [0, 1]] @ diag(sx, sy)
    px = (cos * x + (cos * sh - sin) * y * (sy / sx)) * sx
    py = (sin * x + (sin * sh + cos) * y * (sy / sx)) * sx
    pts = np.stack([px, py], axis=-1) + 0.5 + shift[:, None, :] + stroke_shift[:, g.stroke_of, :] + tremor
    return pts, width, g


def render(glyph: Glyph, rng: np.random.Generator | None, size: int, instances: int = 1) -> np.ndarray:
    """uint8 [instances, size, size], white strokes on black; rng None draws the undistorted glyph once."""
    if rng is None:
        g = _prepare(glyph)
        pts, widths = g.points[None], np.array([0.07])
    else:
        pts, widths, g = jitter(glyph, rng, instances)
    return draw(pts, widths, g, size)


def draw(pts: np.ndarray, widths: np.ndarray, g: _Prepared, size: int) -> np.ndarray:
    """uint8 [instances, size, size] from points [instances, P, 2] in the unit square and pen widths (fractions of
    the side), as `jitter` makes them (data/domains.py restyles them first)."""
    over = 4 if size <= 32 else 2
    canvas = size * over
    out = np.empty((len(pts), size, size), np.uint8)
    for i, (p, width) in enumerate(zip(pts * canvas, widths)):
        im = Image.new("L", (canvas, canvas), 0)
        pen = ImageDraw.Draw(im)
        w = max(1, round(float(width) * canvas))
        r = w / 2
        for a, b in g.bounds:
            pen.line(p[a:b].ravel().tolist(), fill=255, width=w)
        for x, y in p[g.dots].tolist():
            pen.ellipse((x - r, y - r, x + r, y + r), fill=255)
        out[i] = np.asarray(im.reduce(over), dtype=np.uint8)
    return out


def glyph_classes(spec: GlyphSetSpec, glyphs: list[Glyph] | None = None) -> Iterator[SourceClass]:
    glyphs = catalog(spec.classes) if glyphs is None else glyphs
    groups: dict[str, list[str]] = {}
    for g in glyphs:
        groups.setdefault(g.alphabet, []).append(g.name)
    splits = dict(iter_split_by_group(groups, SPLIT_FRACTIONS, spec.seed))
    for g in glyphs:
        imgs = render(g, class_rng(spec.seed, g.name), spec.image_size, spec.instances)
        yield SourceClass(g.name, g.alphabet, splits[g.alphabet], list(imgs))


def write_glyph_set(spec: GlyphSetSpec, out: str | Path, overwrite: bool = False, progress: bool = True) -> Path:
    glyphs = catalog(spec.classes)
    info = {
        "format": "glyphs",
        "render_version": RENDER_VERSION,
        "image_size": spec.image_size,
        "classes": len(glyphs),
        "instances": spec.instances,
        "seed": spec.seed,
        "licences": {"kanjivg": "CC BY-SA 3.0 (Ulrich Apel, kanjivg.tagaini.net)", "Hershey-Fonts": "MIT"},
    }
    pack(glyph_classes(spec, glyphs), out, source=info, overwrite=overwrite, progress=progress, total=len(glyphs))
    return Path(out)


def prepare_glyphs(root: str | Path, spec: GlyphSetSpec, progress: bool = True) -> Path:
    """The packed glyph set under `root`, rendered on first use. Concurrent callers serialise on a file lock: the
    first renders and packs (atomically), the others wait and reuse its result; a crashed holder's lock is freed
    by the kernel and the next caller renders again."""
    root = Path(root)
    out = root / spec.folder
    if (out / INDEX_NAME).exists():
        return out
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = open(root / f".{spec.folder}.lock", "w")
    except OSError as e:
        raise cannot_create(root, "the glyph set (data.root)", e) from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (out / INDEX_NAME).exists():
                write_glyph_set(spec, out, overwrite=out.exists(), progress=progress)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return out
