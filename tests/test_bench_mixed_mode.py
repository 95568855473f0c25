"""bench/mixed_mode.py at tiny sizes (one model; each peak is a fresh interpreter): its JSON has every field, with
positive figures, the headline ratios are the largest episode's, and the two modes give the same meta-gradient."""

from __future__ import annotations

import pytest

from metascale.bench.mixed_mode import MEMORY_TARGET, PEAK_TIE, REVERSE, _large_rows, run
from metascale.config import ResNet12Spec, ViTSpec

VIT = ViTSpec(in_channels=1, image_size=8, patch_size=4, dim=8, depth=1, heads=2).model_dump()
EPISODE = dict(ways=2, shots=1, queries=2, image_size=8, channels=1)


def _check_reverse(row: dict) -> None:
    """Memory is against reverse's lowest peak; time against the fastest of its paths within PEAK_TIE of that peak."""
    peaks = row["reverse_peak_bytes"]
    assert row["best_reverse"] == min(peaks, key=peaks.get)
    tied = {k for k, b in peaks.items() if b <= (1 + PEAK_TIE) * peaks[row["best_reverse"]]}
    assert set(row["reverse_s_by_path"]) == tied and row["timed_reverse"] in tied
    assert row["reverse_s"] == min(row["reverse_s_by_path"].values()) == row["reverse_s_by_path"][row["timed_reverse"]]


def _check(row: dict) -> None:
    _check_reverse(row)
    assert set(row["mixed_peak_bytes_by_stride"]) == {"1", "2"}  # every step, and every ceil(sqrt(4))-th
    ratio = row["mixed_peak_bytes_by_stride"][str(row["mixed_stride"])] / row["reverse_peak_bytes"][row["best_reverse"]]
    assert row["memory_ratio"] == round(ratio, 3)
    assert all(b > 0 for b in (*row["reverse_peak_bytes"].values(), *row["mixed_peak_bytes_by_stride"].values()))
    assert row["reverse_s"] > 0 and row["mixed_s"] > 0 and row["time_ratio"] > 0
    assert row["meta_gradient_relative_difference"] < 1e-4  # float32, 4 steps


def test_mixed_mode_bench_small_episodes_report_every_field_and_equal_meta_gradients():
    out = run(repeats=1, steps=4, models={"vit": VIT}, episode=EPISODE, larger=(dict(EPISODE, shots=2), {"vit": VIT}),
              skip_mini=True)  # fmt: skip
    assert out["mixed_mode_ratios_episode"] == "2-way 1-shot 2-query 8x8x1"  # without the large episode: this one's
    assert "4 inner steps, 2-way 1-shot 2-query 8x8x1" in out["mixed_mode"]["what"]
    assert (
        out["mixed_mode_memory_ratio"] == out["mixed_mode"]["memory_ratio"] == out["mixed_mode"]["vit"]["memory_ratio"]
    )
    assert out["mixed_mode_time_ratio"] == out["mixed_mode"]["time_ratio"]
    larger = out["mixed_mode_larger_support"]
    assert "4 inner steps, 2-way 2-shot 2-query 8x8x1" in larger["what"]
    assert larger["memory_ratio"] == larger["vit"]["memory_ratio"] and "mixed_mode_miniimagenet" not in out
    for row in (out["mixed_mode"]["vit"], larger["vit"]):
        assert set(row["reverse_peak_bytes"]) == set(REVERSE)
        _check(row)


def test_mixed_mode_bench_large_episode_rows():
    """The 84x84 rows' code (a fresh process per peak, the times in turn in this one) on a tiny episode: mixed mode
    whole and with its support set in chunks (4 examples, 2 at a time block by block, 1 at a time over the whole
    model); the row's ratios are its fastest configuration within the memory target, else its lowest peak."""
    vit = ViTSpec(in_channels=1, image_size=12, patch_size=4, dim=8, depth=2, heads=2).model_dump()
    episode = dict(EPISODE, shots=2, image_size=12)
    row = _large_rows({"vit": vit}, episode, steps=4, workers=2, support_chunk=2, whole_model_chunk=1)["vit"]
    assert set(row["reverse_peak_bytes"]) == {"blocks", "chunked"}  # plain reverse is left out there
    table = row["mixed"]
    assert set(table) == {f"stride{s}{c}" for s in (1, 2) for c in ("", "_chunk2", "_chunk1_whole")}
    _check_reverse(row)
    reverse = row["reverse_peak_bytes"][row["best_reverse"]]
    assert row["reverse_s"] > 0
    for r in table.values():
        assert r["peak_bytes"] > 0 and r["s"] > 0
        assert r["memory_ratio"] == round(r["peak_bytes"] / reverse, 3)
        assert r["time_ratio"] == pytest.approx(r["s"] / row["reverse_s"], rel=0.01)
    within = [k for k, r in table.items() if r["memory_ratio"] <= MEMORY_TARGET]
    chosen = row["mixed_configuration"]
    if within:
        assert chosen == min(within, key=lambda k: table[k]["s"])
    else:
        assert chosen == min(table, key=lambda k: table[k]["peak_bytes"])
    stride, _, chunk = chosen.removeprefix("stride").removesuffix("_whole").partition("_chunk")
    assert (row["mixed_stride"], row["mixed_support_chunk"]) == (int(stride), int(chunk) if chunk else None)
    assert row["mixed_blocks"] == (not chosen.endswith("_whole"))
    assert (row["memory_ratio"], row["time_ratio"], row["mixed_s"]) == (
        table[chosen]["memory_ratio"],
        table[chosen]["time_ratio"],
        table[chosen]["s"],
    )
    assert row["meta_gradient_relative_difference"] < 1e-4  # float32, 4 steps, every mixed configuration


def test_mixed_mode_bench_chunks_resnet12s_support_set():
    """ResNet-12's batch norm sits inside its blocks: its 84x84 row has support-chunk configurations (each block one
    of the 2 support examples at a time, its statistics explicit), with the meta-gradient of reverse mode."""
    net = ResNet12Spec(in_channels=1, channels=[2, 2], image_size=8).model_dump()
    row = _large_rows({"resnet12": net}, EPISODE, steps=1, workers=2, support_chunk=1, whole_model_chunk=1)["resnet12"]
    assert set(row["mixed"]) == {"stride1", "stride1_chunk1"}  # no whole-model chunks: they would split the statistics
    assert row["meta_gradient_relative_difference"] < 1e-4  # float32: the chunked configuration's too
