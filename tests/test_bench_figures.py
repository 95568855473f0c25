"""`metascale plot RESULT.json`: a bench scaling or memory result's figure draws the result's own numbers (read back
from the figure), for small synthetic results shaped like each bench's output; errors are one line."""

from __future__ import annotations

import json

import pytest

from metascale.bench.figures import draw


def _row(params: int, one: float, two: float, ceiling: float) -> dict:
    """One size of `bench scaling`'s output: 1w step `one` s, 2w `two` s (all-reduce 10% slower)."""

    def cfg(step: float, fraction: float) -> dict:
        return {"step_s": step, "coordinator_fraction": fraction, "tasks_per_s": 8 / step}

    return {
        "params": params,
        "bytes": 4 * params,
        "weak_scaling_efficiency": round(one / two, 3),
        "weak_scaling_efficiency_allreduce": round(one / (1.1 * two), 3),
        "compute_contention_ceiling": ceiling,
        "coordinator_fraction": 0.01 * one,
        "coordinator_fraction_allreduce": 0.02 * one,
        "1w": cfg(one, 0.005),
        "2w": cfg(two, 0.01 * one),
        "2w_allreduce": cfg(1.1 * two, 0.02 * one),
    }


SCALING = {
    "bench": "scaling",
    "tasks_per_worker": 8,
    "measured_steps": 3,
    "10M": _row(9_992_683, 3.6, 4.3, 0.83),
    "0.1M": _row(99_679, 0.05, 0.065, 0.74),
    "weak_scaling_efficiency": 0.837,
    "load_avg_1m_before": 1.0,
    "load_avg_1m_after": 2.0,
    "workload": "MAML sinusoid",
}


def test_scaling_figure_draws_each_size_in_order_of_parameters(tmp_path):
    result = draw(SCALING, tmp_path / "scaling.png")
    assert (tmp_path / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    eff = result["series"]["weak scaling efficiency, 1 -> 2 workers"]
    small, big = SCALING["0.1M"], SCALING["10M"]
    for label, key in (
        ("coordinator aggregation", "weak_scaling_efficiency"),
        ("all-reduce", "weak_scaling_efficiency_allreduce"),
        ("contention ceiling (worker alone / beside another)", "compute_contention_ceiling"),
    ):
        assert eff[label] == {"x": [99_679.0, 9_992_683.0], "y": [small[key], big[key]]}, label
    share = result["series"]["coordinator's share of a meta-step, 2 workers"]
    assert share["all-reduce"]["y"] == [small["coordinator_fraction_allreduce"], big["coordinator_fraction_allreduce"]]
    steps = result["series"]["seconds per meta-step (best step)"]
    assert steps["2 workers, all-reduce"]["y"] == pytest.approx([1.1 * 0.065, 1.1 * 4.3])
    assert steps["1 worker"]["y"] == [0.05, 3.6]


CPU_MEMORY = {
    "bench": "memory",
    "budget_mib_per_process": 1024.0,
    "depths": [2, 6, 10],
    "vit": {"dim": 96},
    "peak_mib": {"without": [100.0, 240.0, 380.0], "with_zero3_2ranks_checkpointing": [180.0, 196.0, 212.0]},
    "step_s": {"without": [0.3, 1.0, 1.2], "with_zero3_2ranks_checkpointing": [0.6, 1.3, 2.0]},
    "largest_backbone_depth": {"without": 27, "with_zero3_2ranks_checkpointing": 211},
    "largest_backbone_params": {"without": 3_000_000, "with_zero3_2ranks_checkpointing": 25_000_000},
}


def test_cpu_memory_figure_draws_the_measurements_their_fit_and_the_budget(tmp_path):
    mem = draw(CPU_MEMORY, tmp_path / "m.png")["series"]["memory against depth"]
    replica, rank = "a replica (un-sharded)", "a rank of ZeRO-3 x 2 + per-block checkpointing"
    assert mem[f"{replica}: measured"] == {"x": [2.0, 6.0, 10.0], "y": [100.0, 240.0, 380.0]}
    # the lines through (2, 100), (6, 240), (10, 380): 30 + 35 d; (2, 180) ... (10, 212): 172 + 4 d
    assert mem[f"{replica}: fit, 35 MiB a block"] == {"x": [0.0, 27.0], "y": pytest.approx([30.0, 30.0 + 35 * 27])}
    assert mem[f"{rank}: fit, 4 MiB a block"] == {"x": [0.0, 211.0], "y": pytest.approx([172.0, 172.0 + 4 * 211])}
    assert mem["largest under the budget (fit): depth 211, 25.0M params"]["y"] == pytest.approx([172.0 + 4 * 211])
    assert mem["budget per process: 1024 MiB"] == {"x": [0.0, 211.0], "y": [1024.0, 1024.0]}


def test_gpu_memory_figure_draws_the_largest_depth_that_ran(tmp_path):
    def side(per_block: float, depths: tuple, largest: int) -> dict:
        pts = [
            {"depth": d, "peak_gib": 0.5 + per_block * d, "step_s": 0.1 * d, "params": 12_600_000 * d} for d in depths
        ]
        return {
            "fit_points": pts,
            "largest": {"depth": largest, "peak_gib": 70.0, "step_s": 9.0, "params": 12_600_000 * largest},
        }

    result = {
        "bench": "memory",
        "device": "GPU X",
        "capacity_gib": 76.8,
        "without": "fp32",
        "with": "lean",
        "plain": side(1.25, (2, 4, 8), 57),
        "checkpointing_bf16": side(0.25, (4, 8, 16), 279),
    }
    series = draw(result, tmp_path / "g.png")["series"]
    mem, time = series["memory against depth"], series["time against depth"]
    assert mem["fp32: measured"]["y"] == pytest.approx([3.0, 5.5, 10.5])
    assert mem["largest that ran: depth 279, 3.52B params"] == {"x": [279.0], "y": [70.0]}
    assert mem["97% of GPU X: 76.8 GiB"]["y"] == [76.8, 76.8]
    assert time["lean"] == {"x": [4.0, 8.0, 16.0, 279.0], "y": pytest.approx([0.4, 0.8, 1.6, 9.0])}


def test_cli_plots_a_saved_bench_output_and_prints_one_json_line(cli, tmp_path):
    saved = tmp_path / "scaling.json"
    saved.write_text("some log line\n" + json.dumps(SCALING) + "\n")  # a bench's whole stdout: its last line counts
    code, out, err = cli("plot", str(saved))
    assert code == 0, err
    line = json.loads(out.splitlines()[-1])
    assert line["png"] == str(tmp_path / "scaling.png") and line["bench"] == "scaling"
    assert line["points"]["weak scaling efficiency, 1 -> 2 workers: all-reduce"] == 2


@pytest.mark.parametrize(
    "text, message",
    [
        (
            '{"bench": "data", "episodes_per_s": 1.0}',
            "figures are drawn for `bench scaling` and `bench memory` results",
        ),
        ('{"bench": "memory", "depths": [2]}', "the memory result lacks 'peak_mib'"),
        ('{"bench": "memory", "plain": {"largest": null}}', "the memory result lacks 'fit_points'"),
        ('{"bench": "scaling"}', "holds no measured size"),
        ("not json", "not a bench result"),
    ],
)
def test_cli_errors_are_one_line(cli, tmp_path, text, message):
    (tmp_path / "r.json").write_text(text)
    code, out, err = cli("plot", str(tmp_path / "r.json"))
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "r.png").exists()
    code, out, err = cli("plot", str(tmp_path / "missing.json"))
    assert code == 2 and err.count("\n") == 1 and "No such file or directory" in err, err
