"""`metascale plot RESULT.json`: a `bench scaling` or `bench memory` result drawn as a PNG, from the JSON the bench
printed (its last line), so that a figure in the docs is always a drawing of a saved, real measurement.

scaling: per model size, weak scaling efficiency 1 -> 2 workers (coordinator aggregation, all-reduce, and the
machine's own contention ceiling), the coordinator's share of a meta-step, and seconds per meta-step.
memory: peak memory of one meta-gradient item against backbone depth, without and with the memory savers, each
side's fitted line up to its largest depth under the budget, and seconds per item. Both the CPU result (MiB, a
per-process budget) and the `--device cuda` one (GiB, 97% of the card) are drawn.
Like `plot`, `draw` returns the series as drawn, read back from the figure.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from metascale.errors import MetascaleError


class FigureError(MetascaleError):
    exit_code = 2


def _sizes(result: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The measured model sizes of a scaling result, smallest first."""
    rows = [(k, v) for k, v in result.items() if isinstance(v, dict) and "params" in v and "1w" in v]
    if not rows:
        raise FigureError('the scaling result holds no measured size (a key like "10M" with "params" and "1w")')
    return sorted(rows, key=lambda kv: kv[1]["params"])


def _scaling(fig: Any, result: dict[str, Any]) -> None:
    rows = _sizes(result)
    x = [float(r["params"]) for _, r in rows]
    panels = (
        (
            "weak scaling efficiency, 1 -> 2 workers",
            (
                ("coordinator aggregation", lambda r: r["weak_scaling_efficiency"], "-"),
                ("all-reduce", lambda r: r["weak_scaling_efficiency_allreduce"], "-"),
                ("contention ceiling (worker alone / beside another)", lambda r: r["compute_contention_ceiling"], ":"),
            ),
            "tasks/s with 2 workers / (2 x with 1)",
        ),
        (
            "coordinator's share of a meta-step, 2 workers",
            (
                ("coordinator aggregation", lambda r: r["coordinator_fraction"], "-"),
                ("all-reduce", lambda r: r["coordinator_fraction_allreduce"], "-"),
            ),
            "put + gather + aggregate + Adam, over the step",
        ),
        (
            "seconds per meta-step (best step)",
            (
                ("1 worker", lambda r: r["1w"]["step_s"], "-"),
                ("2 workers, coordinator", lambda r: r["2w"]["step_s"], "-"),
                ("2 workers, all-reduce", lambda r: r["2w_allreduce"]["step_s"], "-"),
            ),
            "seconds (log scale)",
        ),
    )
    for i, (title, lines, ylabel) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for label, value, style in lines:
            ax.plot(x, [float(value(r)) for _, r in rows], marker="o", linestyle=style, label=label)
        ax.set_xscale("log")
        ax.set_xticks(x, [name for name, _ in rows])
        ax.minorticks_off()
        if "log" in ylabel:
            ax.set_yscale("log")
        else:
            ax.set_ylim(0, 1.05 if i == 0 else None)
        ax.set_xlabel("model size (parameters)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
    fig.suptitle(
        f"bench scaling: {result.get('workload', '')}; {result.get('tasks_per_worker', '?')} tasks a worker, "
        f"best of {result.get('measured_steps', '?')} steps; load "
        f"{result.get('load_avg_1m_before', '?')} -> {result.get('load_avg_1m_after', '?')}",
        fontsize="medium",
    )


def _memory_sides(result: dict[str, Any]) -> tuple[list[dict[str, Any]], float, str, str]:
    """Either memory result as (sides, budget, unit, budget label); a side: label, depths, peaks, step_s, largest."""
    try:
        if "plain" in result:  # --device cuda: measured fit points, and the largest depth that ran
            return (
                [_gpu_side(result, "plain", "without"), _gpu_side(result, "checkpointing_bf16", "with")],
                float(result["capacity_gib"]),
                "GiB",
                f"97% of {result.get('device', 'the GPU')}",
            )
        labels = {
            "without": "a replica (un-sharded)",
            "with_zero3_2ranks_checkpointing": "a rank of ZeRO-3 x 2 + per-block checkpointing",
        }
        sides = [
            {
                "label": label,
                "depths": result["depths"],
                "peaks": result["peak_mib"][key],
                "step_s": result["step_s"][key],
                "largest_depth": result["largest_backbone_depth"][key],
                "largest_params": result["largest_backbone_params"][key],
                "largest_peak": None,
                "largest_step_s": None,
            }
            for key, label in labels.items()
        ]
        return sides, float(result["budget_mib_per_process"]), "MiB", "budget per process"
    except KeyError as e:
        raise FigureError(f"the memory result lacks {e}: expected `metascale bench memory`'s output") from None


def _gpu_side(result: dict[str, Any], key: str, what: str) -> dict[str, Any]:
    pts, big = result[key]["fit_points"], result[key].get("largest") or {}
    return {
        "label": result.get(what, what),
        "depths": [p["depth"] for p in pts],
        "peaks": [p["peak_gib"] for p in pts],
        "step_s": [p["step_s"] for p in pts],
        "largest_depth": big.get("depth"),
        "largest_params": big.get("params"),
        "largest_peak": big.get("peak_gib"),
        "largest_step_s": big.get("step_s"),
    }


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


def _memory(fig: Any, result: dict[str, Any]) -> None:
    import numpy as np

    sides, budget, unit, budget_label = _memory_sides(result)
    mem, sec = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    top = max([s["largest_depth"] or 0 for s in sides] + [d for s in sides for d in s["depths"]])
    for s in sides:
        (pts,) = mem.plot(s["depths"], s["peaks"], marker="o", linestyle="none", label=f"{s['label']}: measured")
        slope, intercept = np.polyfit(s["depths"], s["peaks"], 1)
        end = s["largest_depth"] or max(s["depths"])
        mem.plot(
            [0, end],
            [intercept, intercept + slope * end],
            color=pts.get_color(),
            linestyle="--",
            label=f"{s['label']}: fit, {slope:.3g} {unit} a block",
        )
        if s["largest_depth"]:
            peak = s["largest_peak"] if s["largest_peak"] is not None else intercept + slope * end
            ran = "largest that ran" if s["largest_peak"] is not None else "largest under the budget (fit)"
            mem.plot(
                [end],
                [peak],
                marker="*",
                markersize=12,
                linestyle="none",
                color=pts.get_color(),
                label=f"{ran}: depth {end}, {_count(s['largest_params'])} params",
            )
        depths, times = list(s["depths"]), list(s["step_s"])
        if s["largest_step_s"] is not None:
            depths, times = depths + [end], times + [s["largest_step_s"]]
        sec.plot(depths, times, marker="o", label=s["label"])
    mem.plot([0, top], [budget, budget], color="black", linestyle=":", label=f"{budget_label}: {budget:g} {unit}")
    mem.set_ylabel(f"peak memory of one meta-gradient item ({unit})")
    mem.set_title("memory against depth")
    sec.set_ylabel("seconds per item")
    sec.set_title("time against depth")
    for ax in (mem, sec):
        ax.set_xlabel("backbone depth (ViT blocks)")
    vit = result.get("vit", {})
    fig.suptitle(
        f"bench memory ({result.get('device') or result.get('machine', '')}): ViT dim {vit.get('dim', '?')}, "
        f"{result.get('algorithm', '')}, one {result.get('episode', '')} episode",
        fontsize="medium",
    )


def draw(result: dict[str, Any], out: str | Path) -> dict[str, Any]:
    """Draws a bench result to `out`; returns {png, bench, series: {panel title: {label: {x, y}}}}."""
    from matplotlib.figure import Figure

    from metascale.plot import drawn_series, finish, save

    kind = result.get("bench")
    if kind not in ("scaling", "memory"):
        raise FigureError(f"bench {kind!r}: figures are drawn for `bench scaling` and `bench memory` results")
    fig = Figure(figsize=(18 if kind == "scaling" else 14, 5), layout="constrained")
    (_scaling if kind == "scaling" else _memory)(fig, result)
    series = {}
    for ax in fig.axes:
        finish(ax)
        series[ax.get_title()] = drawn_series(ax)
    save(fig, out)
    return {"png": str(out), "bench": kind, "series": series}
