"""`metascale bench scaling`'s knobs: the model-size knob builds models of the stated size, bad sizes are clear errors.
(The benchmark's figures live in docs/benchmarks.md, never in tests.)"""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from metascale.bench.scaling import job
from metascale.cli import app
from metascale.models import build_model


@pytest.mark.parametrize("params", [100_000, 10_000_000])
def test_mlp_is_sized_to_the_requested_parameter_count(params):
    spec = job(params, workers=2, tasks_per_worker=3, aggregation="allreduce")
    model = build_model(spec.model, 1)
    assert abs(sum(p.numel() for p in model.parameters()) - params) / params < 1e-2  # W is an integer
    assert spec.outer.meta_batch == 6 and spec.cluster.aggregation == "allreduce"


def test_unknown_size_is_a_clear_error():
    r = CliRunner().invoke(app, ["bench", "scaling", "--sizes", "0.1M,1G"])
    text = " ".join(r.output.replace("│", " ").split())  # rich wraps the message in a box
    assert r.exit_code == 2 and "unknown size(s) ['1G']" in text and "0.1M, 10M, 100M" in text


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the error on a machine without CUDA")
@pytest.mark.parametrize("bench", ["inner-loop", "memory"])
def test_cuda_benchmarks_say_so_where_there_is_no_gpu(bench):
    r = CliRunner().invoke(app, ["bench", bench, "--device", "cuda"])
    text = " ".join(r.output.replace("│", " ").split())
    assert r.exit_code == 2 and "no CUDA device is visible" in text
