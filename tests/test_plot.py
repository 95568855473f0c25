"""`metascale plot RUN`: the series drawn (read back from the figure) are the numbers the run logged, read
independently from its W&B run file; a resumed run's sessions are joined; errors are one line."""

from __future__ import annotations

import json
import sys
import time

import pytest
import yaml

from metascale.config import parse_spec
from metascale.monitor import Monitor
from metascale.plot import plot
from wandb_records import find_run_files, history, settled

SPEC = {
    "name": "curves",
    "outer": {"steps": 8},
    "data": {"source": "synthetic", "ways": 3},
    "model": {"name": "conv4", "hidden": 8},
}


def _metrics(step: int, shift: float = 0.0) -> dict[str, float]:
    m = {
        "train/loss": 2.0 / step + shift,
        "train/accuracy": 0.1 * step,
        "train/lr": 0.001,
        "episodes_per_s": 10.0 + step,
        "step_s": 0.5 + 0.01 * step,
        "worker/0/compute_s": 0.2 + 0.01 * step,
        "worker/1/compute_s": 0.3 - 0.01 * step,
    }
    if step % 4 == 0:
        m.update({"eval/loss": 1.5 / step, "eval/accuracy": 0.08 * step})
    return m


def _session(tmp_path, steps, run_id=None, shift=0.0, final=True):
    spec = parse_spec(
        {**SPEC, "logging": {"wandb": {"mode": "offline", "dir": str(tmp_path / "wb")}, "progress": False}}
    )
    monitor = Monitor(spec, run_id, steps[0] - 1)
    for step in steps:
        monitor.step(step, _metrics(step, shift))
    if final:
        monitor.summary({"final/loss": 0.25, "final/accuracy": 0.875, "final/episodes": 12})
    monitor.close()
    for f in find_run_files(tmp_path / "wb"):
        settled(f)  # W&B's core process writes the file behind the client
    return monitor.run_id


def _logged(files, key):
    """(steps, values) of `key` straight from the run files; a later session's value for a step wins."""
    by_step = {}
    for f in files:
        for row in history(settled(f)):
            if key in row:
                by_step[row["_step"]] = row[key]
    return sorted(by_step), [by_step[s] for s in sorted(by_step)]


def test_the_plotted_series_are_the_logged_numbers(tmp_path):
    _session(tmp_path, range(1, 9))
    files = [settled(f) for f in find_run_files(tmp_path / "wb")]
    result = plot(tmp_path / "wb")
    assert result["png"] == str(tmp_path / "wb" / f"curves-{result['run_id']}.png")  # beside wb/wandb/
    assert open(result["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    drawn = result["series"]
    assert set(drawn) == {"loss", "accuracy", "episodes_per_s", "step_time"}
    assert set(drawn["loss"]) == {"train/loss", "eval/loss", "final/loss"}
    assert set(drawn["step_time"]) == {"step_s", "worker/0/compute_s", "worker/1/compute_s"}
    for panel in drawn.values():
        for key, points in panel.items():
            steps, values = _logged(files, key)
            assert points["x"] == steps and points["y"] == pytest.approx(values), key
    assert drawn["loss"]["train/loss"]["y"] == pytest.approx(
        [2.0 / s for s in range(1, 9)]
    )  # and those are the numbers given to the monitor
    assert drawn["accuracy"]["eval/accuracy"] == {"x": [4.0, 8.0], "y": pytest.approx([0.32, 0.64])}
    assert drawn["accuracy"]["final/accuracy"]["y"] == [0.875]


def test_a_resumed_run_is_drawn_whole_with_the_later_sessions_values(tmp_path):
    rid = _session(tmp_path, range(1, 7), final=False)  # killed after step 6, its checkpoint at step 4
    time.sleep(1.1)  # W&B names a session's folder by the second it started
    assert _session(tmp_path, range(5, 9), run_id=rid, shift=1.0) == rid
    assert len(find_run_files(tmp_path / "wb")) == 2
    loss = plot(tmp_path / "wb")["series"]["loss"]["train/loss"]
    assert loss["x"] == [float(s) for s in range(1, 9)]
    assert loss["y"] == pytest.approx([2.0 / s for s in range(1, 5)] + [2.0 / s + 1.0 for s in range(5, 9)])


def test_cli_plots_a_job_spec_and_prints_one_json_line(cli, tmp_path):
    _session(tmp_path, range(1, 9))
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({**SPEC, "logging": {"wandb": {"dir": str(tmp_path / "wb")}}}))
    out_png = tmp_path / "out" / "c.png"
    code, out, err = cli("plot", str(path), "--out", str(out_png))
    assert code == 0, err
    line = json.loads(out.splitlines()[-1])
    assert line["png"] == str(out_png) and out_png.read_bytes()[:4] == b"\x89PNG"
    assert line["points"]["train/loss"] == 8 and line["points"]["eval/accuracy"] == 2


def test_cli_errors_are_one_line(cli, tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    code, out, err = cli("plot", str(tmp_path / "empty"))
    assert code == 2 and err.count("\n") == 1 and "no W&B run files" in err
    code, out, err = cli("plot", str(tmp_path / "missing"))
    assert code == 2 and "no such file or folder" in err
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, out, err = cli("plot", str(tmp_path / "empty"))
    assert (
        code == 1
        and err == "error: metascale plot needs matplotlib, which is not installed: pip install 'metascale[plot]'\n"
    )
