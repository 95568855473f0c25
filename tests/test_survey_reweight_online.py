"""Meta-Weight-Net learns to down-weight flipped labels; the online (FTML) estimator scores each arriving task
before updating on it and takes its meta-gradient over that task and the earlier stream; bad combinations of the
survey's axes are refused with a reason."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from metascale.algorithms.executor import meta_gradient
from metascale.algorithms.mwn import example_weights
from metascale.cluster.coordinator import Coordinator
from metascale.cluster.estimators import backprop, ftml
from metascale.cluster.pool import InlinePool
from metascale.config import load_spec, parse_spec
from metascale.data.tasks import online_stream
from metascale.errors import SpecError


def test_meta_weight_net_gives_flipped_labels_lower_weight_than_clean_ones():
    spec = parse_spec(
        {
            "name": "mwn",
            "model": {"name": "conv4", "hidden": 16},
            "data": {
                "source": "noisy_labels",
                "ways": 5,
                "train_per_class": 200,
                "meta_per_class": 4,
                "batch": 50,
                "meta_batch_size": 20,
                "noise": 1.5,
                "label_noise": 0.4,
            },
            "algorithm": {"name": "mwn", "inner": {"lr": 0.1}},
            "outer": {"optimizer": "sgd", "lr": 0.1, "meta_batch": 1},
            "cluster": {"address": "inline"},
        }
    )
    coord, pool = Coordinator(spec), InlinePool(spec)
    for step in range(80):
        coord.apply(backprop(spec, pool, step, coord.published()))
    source = pool.replica.source("train")
    with torch.no_grad():
        out = pool.replica.alg.f(coord.algorithm.model_params(coord.params), torch.from_numpy(source.train_x))
        losses = F.cross_entropy(out, torch.from_numpy(source.train_y).long(), reduction="none")
        weights = example_weights(coord.params, losses)
    flipped = torch.from_numpy(source.flipped)
    assert 0.25 < flipped.float().mean() < 0.4  # 40% resampled uniformly: ~32% actually change class
    assert weights[flipped].mean() < 0.5 * weights[~flipped].mean(), (weights[flipped].mean(), weights[~flipped].mean())


def _online_spec():
    return parse_spec(
        {
            "name": "online",
            "algorithm": {"name": "maml", "inner": {"lr": 0.01}},
            "outer": {"estimator": "ftml", "meta_batch": 4},
            "executor": {"dtype": "float64"},
            "cluster": {"address": "inline"},
        }
    )


def test_ftml_scores_the_arriving_task_first_then_steps_on_it_and_the_earlier_stream():
    spec = _online_spec()
    coord, pool = Coordinator(spec), InlinePool(spec)
    first = ftml(spec, pool, 0, coord.published())
    assert first.tasks == 1  # only task 0 has arrived
    coord.apply(first)
    coord.step = 6  # task 6 arrives: it, and 3 of tasks 0..5
    result = ftml(spec, pool, 6, coord.published())
    assert result.tasks == 4
    stream = pool.replica.source("train")
    with torch.no_grad():  # task t of the stream is episode (t, 0)
        arriving = pool.replica.alg.task_objective(coord.params, stream.batch(6, [0]).to("cpu", torch.float64)[0])
    assert result.metrics["online_loss"] == pytest.approx(float(arriving.metrics["loss"]), rel=1e-12)
    candidates = []  # the meta-gradient must be the mean over task 6 and 3 distinct earlier tasks
    for others in itertools.combinations(range(6), 3):
        batch = online_stream(stream, [*others, 6]).to("cpu", torch.float64)
        ref = meta_gradient(pool.replica.alg, coord.params, batch)
        if all(torch.allclose(result.grads[k], g / 4, atol=1e-12) for k, g in ref.grads.items()):
            candidates.append(others)
    assert len(candidates) == 1


@pytest.mark.parametrize(
    "patch, reason",
    [
        ({"algorithm": {"name": "mwn"}}, "need data.source 'noisy_labels'"),
        ({"data": {"source": "noisy_labels"}, "model": {"name": "conv4"}}, "need data.source 'noisy_labels'"),
        ({"algorithm": {"name": "learned_hparams", "inner": {"first_order": True}}}, "hypergradient is zero"),
        ({"algorithm": {"name": "imaml", "inner": {"checkpoint": "steps"}}}, "independent of the inner steps"),
        ({"outer": {"estimator": "es", "es": {"objective": "error"}}}, "needs classification data"),
        (
            {
                "data": {"source": "noisy_labels"},
                "model": {"name": "conv4"},
                "algorithm": {"name": "mwn"},
                "outer": {"estimator": "es"},
            },
            "needs a few-shot task stream",
        ),
        (
            {
                "data": {"source": "noisy_labels"},
                "model": {"name": "conv4"},
                "algorithm": {"name": "mwn"},
                "executor": {"strategy": "vmap"},
            },
            "runs per task",
        ),
        (
            {"algorithm": {"name": "fomaml"}, "outer": {"estimator": "ftml"}, "sharding": {"engine": "deepspeed"}},
            "outer.estimator 'ftml' runs on the Ray workers",
        ),
    ],
)
def test_bad_combinations_are_refused_with_a_reason(patch, reason):
    with pytest.raises(SpecError, match=reason):
        parse_spec(patch)


@pytest.mark.parametrize(
    "name",
    [
        "sinusoid-es",
        "sinusoid-imaml",
        "glyphs-learned-hparams",
        "glyphs-learned-loss",
        "glyphs-mwn",
        "sinusoid-online",
        "glyphs-imaml",
        "glyphs-es-accuracy",
    ],
)
def test_example_jobs_validate(name):
    assert load_spec(f"jobs/{name}.yaml").name == name
