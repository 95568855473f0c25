"""`metascale bench dg` (MLDG vs pooled ERM over seeds and held-out domains): the summary's statistics from known
per-run figures, one tiny end-to-end run through the real training loop, and its one-line refusals."""

from __future__ import annotations

import json
import math

import pytest

from metascale.bench.dg import summarise


def _run(method, target, seed, test, val=0.5):
    return {"method": method, "target": target, "seed": seed, "test_accuracy": test, "val_accuracy": val}


def test_summary_is_mean_and_standard_error_over_seeds_and_pairs_by_seed():
    runs = [
        _run("mldg", "rotated", 0, 0.60),
        _run("mldg", "rotated", 1, 0.70),
        _run("erm_pooled", "rotated", 0, 0.50),
        _run("erm_pooled", "rotated", 1, 0.65),
        _run("mldg", "slant", 0, 0.80),
        _run("erm_pooled", "slant", 0, 0.90),
        _run("mldg", "slant", 1, 0.75),  # no ERM run for (slant, 1): left out of the pairs and of the average
    ]
    s = summarise(runs)
    mldg = s["per_target"]["rotated"]["mldg"]["test"]
    assert mldg["n"] == 2 and math.isclose(mldg["mean"], 0.65) and math.isclose(mldg["se"], 0.05)
    rot = s["paired_difference"]["rotated"]  # differences 0.10 and 0.05
    assert rot["n"] == 2 and math.isclose(rot["mean"], 0.075) and math.isclose(rot["se"], 0.025)
    assert s["paired_difference"]["slant"]["n"] == 1 and math.isclose(s["paired_difference"]["slant"]["mean"], -0.1)
    avg = s["paired_difference"]["average_over_targets"]  # only seed 0 has both targets: (0.10 - 0.10) / 2
    assert avg["n"] == 1 and math.isclose(avg["mean"], 0.0, abs_tol=1e-12)


def test_bench_dg_trains_each_method_target_and_seed_and_pairs_them(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = tmp_path / "dg.yaml"
    spec.write_text(
        "name: dg\nmodel: {name: conv4, variant: omniglot, in_channels: 1, hidden: 4, image_size: 28}\n"
        "data: {source: domains, ways: 3, domains: [thin, bold, slant, rotated], target: rotated, per_class: 4,\n"
        "       test_per_class: 4, batch: 2, eval_batch: 6, meta_test_domains: 1}\n"
        "algorithm: {name: mldg, inner: {lr: 0.1}}\n"
        "outer: {optimizer: adam, lr: 0.01, meta_batch: 1, steps: 2}\n"
        "eval: {every: 0, episodes: 2, final_episodes: 2}\ncluster: {address: inline}\n"
    )
    out = tmp_path / "runs.jsonl"
    code, stdout, _ = cli("bench", "dg", str(spec), "--seeds", "0,1", "--targets", "rotated,thin", "--out", str(out))
    assert code == 0
    result = json.loads(stdout.strip().splitlines()[-1])
    runs = result["runs"]
    assert {(r["method"], r["target"], r["seed"]) for r in runs} == {
        (m, t, s) for m in ("mldg", "erm_pooled") for t in ("rotated", "thin") for s in (0, 1)
    }
    assert all(r["steps"] == 2 and r["test_episodes"] == 2 and r["val_episodes"] == 3 * 3 * 4 // 6 for r in runs)
    assert [json.loads(line)["seed"] for line in out.read_text().splitlines()] == [r["seed"] for r in runs]
    by = {(r["method"], r["target"], r["seed"]): r["test_accuracy"] for r in runs}
    diff = [by[("mldg", "thin", s)] - by[("erm_pooled", "thin", s)] for s in (0, 1)]
    assert math.isclose(result["paired_difference"]["thin"]["mean"], sum(diff) / 2)
    assert result["paired_difference"]["average_over_targets"]["n"] == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["--methods", "mldg,maml"], "expected some of mldg, erm_pooled"),
        (["--seeds", "0,x"], "expected integers"),
        (["--targets", "plain"], "is not one of domains"),
    ],
)
def test_bench_dg_refuses_bad_arguments_in_one_line(cli, args, message):
    code, stdout, stderr = cli("bench", "dg", "jobs/glyphs-mldg.yaml", *args)
    text = " ".join((stdout + stderr).replace("│", " ").split())
    assert code == 2 and message in text
