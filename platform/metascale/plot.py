"""`metascale plot RUN`: a run's learning curves as a PNG, from the run's own W&B files, offline; or, given a
`metascale bench scaling|memory` result (RESULT.json), that benchmark's figure (bench/figures.py).

RUN is a job spec (its `logging.wandb.dir`), a `logging.wandb.dir` or its `wandb/` folder (the newest run there),
a run folder (`offline-run-*`, `run-*`) or a run file (`run-*.wandb`). Every W&B run writes these files, online or
not, and a resumed run's sessions are read together (a step logged again after a resume: the later value counts).
Four panels: loss (train, held-out `eval/`, and the final evaluation as a point), accuracy (the same, for
classification), episodes per second, and the seconds each worker computed per meta-step with the step's wall time.
`plot` returns the series exactly as drawn (read back from the figure's lines), which the CLI summarises.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

from metascale.errors import MetascaleError
from metascale.wandb_files import find_run_files, history, run_id, run_info

PANELS = (
    ("loss", "loss", ("train/loss", "eval/loss", "final/loss")),
    ("accuracy", "accuracy", ("train/accuracy", "eval/accuracy", "final/accuracy")),
    ("episodes_per_s", "episodes / s", ("episodes_per_s",)),
    ("step_time", "seconds per meta-step", ("step_s",)),  # + worker/<w>/compute_s, found in the run
)


class PlotError(MetascaleError):
    exit_code = 2


def series(files: list[str]) -> dict[str, tuple[list[float], list[float]]]:
    """key -> (steps, values) of every numeric metric in the run's history, by step; a step logged again (by a
    resumed session) keeps its latest value."""
    by_key: dict[str, dict[float, float]] = {}
    for f in files:
        for row in history(f):
            step = row.get("_step")
            if step is None:
                continue
            for key, value in row.items():
                if key.startswith("_") or isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                by_key.setdefault(key, {})[float(step)] = float(value)
    return {k: (sorted(v), [v[s] for s in sorted(v)]) for k, v in by_key.items()}


def _resolve(where: str | Path) -> list[str]:
    where = Path(where)
    if where.is_file() and where.suffix in (".yaml", ".yml"):
        from metascale.config import load_spec

        spec = load_spec(where)
        where = Path(spec.path(spec.logging.wandb.dir))
    if not where.exists():
        raise PlotError(f"{where}: no such file or folder")
    files = find_run_files(where)
    if not files:
        raise PlotError(f"{where}: no W&B run files (run-*.wandb) found there or in its wandb/ folder")
    return files


def plot(where: str | Path, out: str | Path | None = None) -> dict[str, Any]:
    """Draws the run at `where` to `out` (default: `curves-<run id>.png` beside the run's `wandb/` folder, e.g.
    runs/<job>/); returns {png, run_id, series: {panel: {label: {x, y}}}}, the series read back from the figure."""
    from metascale.extras import require

    require("matplotlib")
    from matplotlib.figure import Figure

    files = _resolve(where)
    rid = run_id(files[-1])
    data = series(files)
    if out is None:
        run_dir = Path(files[-1]).resolve().parent  # <dir>/wandb/<offline->run-*/
        out = run_dir.parent.parent / f"curves-{rid}.png"
    workers = sorted(
        (k for k in data if k.startswith("worker/") and k.endswith("/compute_s")), key=lambda k: (len(k), k)
    )
    panels = [
        (name, title, [k for k in keys if k in data] + (workers if name == "step_time" else []))
        for name, title, keys in PANELS
    ]
    panels = [p for p in panels if p[2]]
    if not panels:
        raise PlotError(f"{files[-1]}: the run logged none of the plotted metrics (train/loss, ...)")

    fig = Figure(figsize=(12, 4 * math.ceil(len(panels) / 2)), layout="constrained")
    try:
        name = run_info(files[-1])["name"]
    except ValueError:  # a file cut short before its run record
        name = ""
    fig.suptitle(f"{name or 'run'} (W&B run {rid})")
    drawn: dict[str, dict[str, dict[str, list[float]]]] = {}
    for i, (name, title, keys) in enumerate(panels):
        ax = fig.add_subplot(math.ceil(len(panels) / 2), 2, i + 1)
        for key in keys:
            x, y = data[key]
            one = len(x) == 1 or key.startswith("final/")
            ax.plot(
                x,
                y,
                label=key,
                marker="o" if one or key.startswith("eval/") else None,
                linestyle="none" if one else "-",
            )
        ax.set_title(title)
        ax.set_xlabel("meta-step")
        if name == "loss" and all(v > 0 for key in keys for v in data[key][1] if math.isfinite(v)):
            ax.set_yscale("log")
        finish(ax)
        drawn[name] = drawn_series(ax)
    save(fig, out)
    return {"png": str(out), "run_id": rid, "series": drawn}


def finish(ax: Any) -> None:
    """The one look of every metascale figure's panel."""
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def save(fig: Any, out: str | Path) -> None:
    """A PNG at 100 dpi in a 256-colour palette: a plot has few colours, and a 250-step run's noisy curves stay
    under 100 KB instead of 200 (Pillow is one of metascale's own dependencies)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Image.open(buf).convert("RGB").quantize(256).save(out, format="PNG", optimize=True)


def drawn_series(ax: Any) -> dict[str, dict[str, list[float]]]:
    """label -> {x, y} of every line on `ax`, read back from the figure: what is returned is what was drawn."""
    return {
        line.get_label(): {"x": [float(v) for v in line.get_xdata()], "y": [float(v) for v in line.get_ydata()]}
        for line in ax.get_lines()
    }


def bench_result(path: Path) -> dict[str, Any]:
    """A bench's JSON object: the whole file, or its last line (a bench's whole stdout saved)."""
    try:
        text = path.read_text()
    except OSError as e:
        raise PlotError(f"{path}: {e.strerror or e}") from None
    lines = text.strip().splitlines()
    for candidate in (text, lines[-1] if lines else ""):
        try:
            result = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(result, dict):
            return result
    raise PlotError(f"{path}: not a bench result (a JSON object, or output whose last line is one)")


def plot_bench(path: str | Path, out: str | Path | None = None) -> dict[str, Any]:
    """Draws a bench result file to `out` (default: the file's name with .png); see bench/figures.py."""
    from metascale.extras import require

    require("matplotlib")
    from metascale.bench.figures import FigureError, draw

    path = Path(path)
    try:
        return draw(bench_result(path), out or path.with_suffix(".png"))
    except FigureError as e:
        raise PlotError(f"{path}: {e}") from None


def register(app: Any) -> None:
    """Adds `metascale plot` to the CLI."""
    import typer

    @app.command(name="plot")
    def plot_(
        run: Path = typer.Argument(
            ...,
            show_default=False,
            help="A job spec, its logging.wandb.dir, a run folder or a run file; or a "
            "`bench scaling|memory` result (.json).",
        ),
        out: Optional[Path] = typer.Option(
            None,
            "--out",
            "-o",
            help="The PNG (default: curves-<run id>.png beside the run's wandb/; "
            "for a bench result, its name with .png).",
        ),
    ) -> None:
        """Draw a run's learning curves (loss, accuracy, episodes/s, per-worker step time), or a bench scaling or
        memory result, to a PNG, offline; the last line is JSON: the PNG, the run id (or bench) and the points drawn
        per series."""
        if run.suffix == ".json":
            result = plot_bench(run, out)
            which = {"bench": result["bench"]}
        else:
            result = plot(run, out)
            which = {"run_id": result["run_id"]}
        points = {
            f"{title}: {label}" if "bench" in which else label: len(s["x"])
            for title, panel in result["series"].items()
            for label, s in panel.items()
        }
        typer.echo(json.dumps({"png": result["png"], **which, "points": points}))
