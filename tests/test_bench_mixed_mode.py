"""bench/mixed_mode.py at tiny sizes (one model, two episodes: each peak is a fresh interpreter): its JSON has every
field, with positive figures, and the two modes it times give the same meta-gradient."""

from __future__ import annotations

from metascale.bench.mixed_mode import REVERSE, run
from metascale.config import ViTSpec


def test_mixed_mode_bench_reports_every_field_and_equal_meta_gradients():
    models = {"vit": ViTSpec(in_channels=1, image_size=8, patch_size=4, dim=8, depth=1, heads=2).model_dump()}
    episode = dict(ways=2, shots=1, queries=2, image_size=8, channels=1)
    out = run(repeats=1, steps=4, models=models, episode=episode, larger=(dict(episode, shots=2), models))
    assert out["mixed_mode_memory_ratio"] > 0 and out["mixed_mode_time_ratio"] > 0
    assert out["mixed_mode_ratios_episode"] == "2-way 1-shot 2-query 8x8x1"
    assert "4 inner steps, 2-way 1-shot 2-query 8x8x1" in out["mixed_mode"]["what"]
    larger = out["mixed_mode_larger_support"]
    assert "4 inner steps, 2-way 2-shot 2-query 8x8x1" in larger["what"]
    assert larger["memory_ratio"] == larger["vit"]["memory_ratio"] and larger["time_ratio"] > 0
    for row in (out["mixed_mode"]["vit"], larger["vit"]):
        assert set(row["reverse_peak_bytes"]) == set(REVERSE)
        assert row["best_reverse"] == min(row["reverse_peak_bytes"], key=row["reverse_peak_bytes"].get)
        assert set(row["mixed_peak_bytes_by_stride"]) == {"1", "2"}  # every step, and every ceil(sqrt(4))-th
        assert all(b > 0 for b in (*row["reverse_peak_bytes"].values(), *row["mixed_peak_bytes_by_stride"].values()))
        assert row["memory_ratio"] > 0 and row["reverse_s"] > 0 and row["mixed_s"] > 0 and row["time_ratio"] > 0
        assert row["meta_gradient_relative_difference"] < 1e-4  # float32, 4 steps
