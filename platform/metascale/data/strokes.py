"""Pen-stroke characters from pip packages, grouped into alphabets: the raw material of the glyph set.

- KanjiVG (PyPI `kanjivg`, CC BY-SA 3.0, Ulrich Apel): SVG stroke paths (cubic Beziers) of 6,703 characters,
  installed as `site-packages/kanji/*.svg`. Kana become the alphabets `hiragana` and `katakana`; kanji are grouped by
  their radical (KanjiVG's `kvg:radical` element), simplest first.
- Hershey fonts (PyPI `Hershey-Fonts`, MIT): polyline glyphs of 32 fonts; each script-like font is an alphabet.

A glyph is a list of strokes, each an [n, 2] float64 polyline in the unit square (y down), fitted to the box.
"""

from __future__ import annotations

import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

Stroke = np.ndarray  # [n, 2]


@dataclass(frozen=True)
class Glyph:
    name: str  # unique, stable: the class name in the index
    alphabet: str
    strokes: tuple[Stroke, ...]


# Fonts whose glyphs look like distinct scripts (the Latin look-alikes 'rowman*', 'times*', 'futuram' are left out).
HERSHEY_ALPHABETS = (
    "futural",
    "scripts",
    "cursive",
    "gothiceng",
    "gothicger",
    "gothicita",
    "greek",
    "cyrillic",
    "japanese",
    "astrology",
    "meteorology",
    "music",
    "symbolic",
    "mathupp",
    "mathlow",
    "markers",
)
MAX_KANJI_STROKES = 12  # denser kanji turn into blobs at 28x28
_NUM = re.compile(r"[MmCcSsLlHhVvZz]|-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_RADICAL = re.compile(r'kvg:element="([^"]+)"(?:[^>]*?kvg:original="([^"]+)")?[^>]*kvg:radical="general"')
_PATH_D = re.compile(r'<path [^>]*?\sd="([^"]+)"')


def kanjivg_dir() -> Path:
    d = Path(sysconfig.get_paths()["purelib"]) / "kanji"
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: KanjiVG's SVGs are missing (pip install kanjivg)")
    return d


def hershey_glyphs() -> list[Glyph]:
    from HersheyFonts import HersheyFonts

    fonts = HersheyFonts()
    out = []
    for font in HERSHEY_ALPHABETS:
        fonts.load_default_font(font)
        for char in sorted(fonts.all_glyphs):
            strokes = [np.array(s, dtype=np.float64) for s in fonts.strokes_for_text(char) if len(s) >= 2]
            fitted = _fit(strokes)
            if fitted:
                out.append(Glyph(f"hershey-{font}/U+{ord(char):04X}", f"hershey-{font}", fitted))
    return out


def kanjivg_glyphs(max_per_alphabet: int, max_total: int, max_strokes: int = MAX_KANJI_STROKES) -> list[Glyph]:
    """Kana (by script), then kanji grouped by radical, largest groups first, each group's simplest characters
    first; only what is kept gets parsed. Variant files (`*-Kaisho.svg`) are left out."""
    groups: dict[str, list[tuple[int, int, list[str]]]] = {}
    for f in sorted(kanjivg_dir().glob("?????.svg")):
        code = int(f.stem, 16)
        if not 0x3041 <= code <= 0x9FFF:
            continue
        text = f.read_text(encoding="utf-8")
        if code <= 0x309F:
            alphabet = "hiragana"
        elif code <= 0x30FF:
            alphabet = "katakana"
        elif code >= 0x4E00:
            m = _RADICAL.search(text)
            alphabet = f"kanji-{m.group(2) or m.group(1)}" if m else "kanji-other"
        else:
            continue
        paths = _PATH_D.findall(text)
        if paths and len(paths) <= max_strokes:
            groups.setdefault(alphabet, []).append((len(paths), code, paths))
    kana = [a for a in ("hiragana", "katakana") if a in groups]
    radicals = sorted(
        (a for a in groups if a.startswith("kanji-") and a != "kanji-other"), key=lambda a: (-len(groups[a]), a)
    )
    out: list[Glyph] = []
    for alphabet in kana + radicals:
        for _, code, paths in sorted(groups[alphabet])[:max_per_alphabet]:
            if len(out) >= max_total:
                return out
            fitted = _fit([parse_path(d) for d in paths])
            if fitted:
                out.append(Glyph(f"kanjivg/U+{code:04X}", alphabet, fitted))
    return out


def parse_path(d: str, per_curve: int = 6) -> Stroke:
    """An SVG path (M/C/S/L/H/V/Z, absolute or relative) flattened to a polyline."""
    tokens = _NUM.findall(d)
    pts: list[tuple[float, float]] = []
    cur = start = np.zeros(2)
    last_ctrl = None
    cmd, i = "M", 0
    t = np.linspace(0, 1, per_curve + 1)[1:, None]
    while i < len(tokens):
        if tokens[i].isalpha():
            cmd, i = tokens[i], i + 1
            if cmd in "Zz":
                pts.append(tuple(start))
                cur = start
                continue
        rel = cmd.islower()
        base = cur if rel else np.zeros(2)
        c = cmd.upper()
        n = {"M": 2, "L": 2, "H": 1, "V": 1, "C": 6, "S": 4}.get(c)
        if n is None:
            raise ValueError(f"unsupported SVG path command '{cmd}' in '{d[:40]}'")
        v = np.array([float(x) for x in tokens[i : i + n]])
        i += n
        if c == "M":
            cur = start = base + v
            pts.append(tuple(cur))
            cmd = "l" if rel else "L"  # further pairs after M are line-tos
        elif c in "LHV":
            cur = (
                base + v
                if c == "L"
                else (np.array([base[0] + v[0], cur[1]]) if c == "H" else np.array([cur[0], base[1] + v[0]]))
            )
            pts.append(tuple(cur))
        else:
            if c == "C":
                p1, p2, p3 = base + v[0:2], base + v[2:4], base + v[4:6]
            else:
                p1 = 2 * cur - last_ctrl if last_ctrl is not None else cur
                p2, p3 = base + v[0:2], base + v[2:4]
            curve = (1 - t) ** 3 * cur + 3 * (1 - t) ** 2 * t * p1 + 3 * (1 - t) * t**2 * p2 + t**3 * p3
            pts += [tuple(p) for p in curve]
            cur, last_ctrl = p3, p2
            continue
        last_ctrl = None
    return np.array(pts, dtype=np.float64)


def _fit(strokes: list[Stroke], margin: float = 0.12) -> tuple[Stroke, ...]:
    """Scales and centres the glyph into [margin, 1 - margin]^2, keeping its aspect ratio; () if degenerate."""
    strokes = [s for s in strokes if len(s) >= 2]
    if not strokes:
        return ()
    allp = np.concatenate(strokes)
    lo, hi = allp.min(0), allp.max(0)
    extent = float((hi - lo).max())
    if extent <= 0:
        return ()
    scale = (1 - 2 * margin) / extent
    centre = (lo + hi) / 2
    return tuple((s - centre) * scale + 0.5 for s in strokes)
