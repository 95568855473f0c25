"""`metascale data ...`: pack datasets into task shards, render the glyph set, inspect a packed set."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Optional

import typer

from metascale.errors import SpecError

data_app = typer.Typer(
    help="Task data: pack datasets into WebDataset task shards, render the glyph set.", no_args_is_help=True
)


def _fractions(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(x) for x in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or min(parts) < 0 or sum(parts) <= 0:
        raise SpecError("--split", [f"expected three non-negative numbers TRAIN,VAL,TEST (got '{text}')"])
    return parts  # type: ignore[return-value]


@data_app.command()
def pack(
    src: Path = typer.Argument(
        ..., help="Dataset on disk (a folder, or an .npz for --format numpy; ignored by digits)."
    ),
    out: Path = typer.Argument(..., help="Output folder: shards + index.json (written atomically)."),
    format: str = typer.Option(
        ...,
        "--format",
        help="omniglot | imagefolder | numpy | digits | miniimagenet | tieredimagenet | cub | cifarfs | fc100",
    ),
    size: Optional[int] = typer.Option(None, min=1, help="Resize every image to SIZE x SIZE."),
    split: str = typer.Option("0.64,0.16,0.2", help="TRAIN,VAL,TEST class fractions where the source has no splits."),
    val_fraction: float = typer.Option(0.2, min=0, max=1, help="Omniglot: share of background alphabets for val."),
    seed: int = typer.Option(0, help="Seed of the class/alphabet split."),
    invert: Optional[bool] = typer.Option(None, "--invert/--no-invert", help="Invert grey levels (Omniglot: on)."),
    classes_per_shard: int = typer.Option(64, min=1, help="Most classes in one shard."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists."),
) -> None:
    """Convert a dataset into class-grouped WebDataset shards plus index.json."""
    from metascale.data.formats import ReadOptions, read_source
    from metascale.data.pack import pack as pack_classes

    opts = ReadOptions(size=size, fractions=_fractions(split), val_fraction=val_fraction, seed=seed, invert=invert)
    source = read_source(format, src, opts)  # type: ignore[arg-type]
    t0 = time.perf_counter()
    index = pack_classes(
        source.classes,
        out,
        source=source.info,
        max_classes_per_shard=classes_per_shard,
        overwrite=overwrite,
        total=source.total,
    )
    typer.echo(json.dumps(_summary(index, out) | {"seconds": round(time.perf_counter() - t0, 2)}))


@data_app.command()
def glyphs(
    out: Path = typer.Argument(..., help="Output folder for the packed glyph set."),
    size: int = typer.Option(28, help="Image side: 28 or 84."),
    classes: int = typer.Option(1623, min=1, help="Number of characters (Omniglot: 1,623)."),
    instances: int = typer.Option(20, min=1, help="Drawings per character (Omniglot: 20)."),
    seed: int = typer.Option(0, help="Rendering seed (the published set uses 0)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists."),
) -> None:
    """Render the offline glyph set (KanjiVG + Hershey strokes, jittered per drawer) and pack it."""
    from metascale.data.glyphs import GlyphSetSpec, write_glyph_set
    from metascale.data.index import load_index

    if size not in (28, 84):
        raise SpecError("--size", [f"expected 28 or 84 (got {size})"])
    t0 = time.perf_counter()
    write_glyph_set(GlyphSetSpec(size, classes, instances, seed), out, overwrite=overwrite)
    typer.echo(json.dumps(_summary(load_index(str(out)), out) | {"seconds": round(time.perf_counter() - t0, 2)}))


@data_app.command()
def info(root: str = typer.Argument(..., help="A packed set: local folder or fsspec URL.")) -> None:
    """Summarise a packed set's index: classes, alphabets and images per split."""
    from metascale.data.index import load_index

    typer.echo(json.dumps(_summary(load_index(root), root)))


def _summary(index, out) -> dict:
    per = Counter(c.split for c in index.classes)
    images = Counter()
    alphabets: dict[str, set] = {}
    for c in index.classes:
        images[c.split] += c.count
        alphabets.setdefault(c.split, set()).add(c.alphabet)
    return {
        "out": str(out),
        "shards": len(index.shards),
        "image": index.image,
        "classes": dict(per),
        "alphabets": {k: len(v) for k, v in alphabets.items()},
        "images": dict(images),
    }
