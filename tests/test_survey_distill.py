"""Dataset distillation: the meta-gradient w.r.t. the synthetic images and the learned learning rate against central
finite differences (float64, a tiny MLP), fresh initialisations drawn from the task alone, a short distillation
beating as many random real images at the best of several learning rates, the .npz export, and refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metascale.algorithms import build_algorithm
from metascale.algorithms.distill import IMAGES, LOG_LR, fresh_init, task_seed
from metascale.algorithms.executor import meta_gradient
from metascale.cluster.coordinator import Coordinator
from metascale.cluster.estimators import backprop
from metascale.cluster.pool import InlinePool
from metascale.cluster import checkpoint
from metascale.config import AlgorithmSpec, DistillSpec, InnerLoopSpec, MLPSpec, dump_spec, load_spec, parse_spec
from metascale.data.tasks import Task, TaskBatch
from metascale.errors import MetascaleError, SpecError
from metascale.evaluate import evaluate
from metascale.export import export_model
from metascale.train import train
from metascale.models import build_model


def _tiny():
    torch.manual_seed(0)
    model = build_model(MLPSpec(in_features=3, hidden=[4]), 3).double()
    spec = AlgorithmSpec(
        name="distill", inner=InnerLoopSpec(steps=3, lr=0.1), distill=DistillSpec(shape=[3], init_lr=0.3)
    )
    alg = build_algorithm(spec, model)
    g = torch.Generator().manual_seed(1)
    task = Task(
        torch.randn(9, 3, generator=g, dtype=torch.float64),
        torch.arange(9) % 3,
        torch.randn(6, 3, generator=g, dtype=torch.float64),
        torch.arange(6) % 3,
    )
    return alg, alg.init(dict(model.named_parameters())), task


def test_distill_meta_gradient_matches_finite_differences():
    alg, meta, task = _tiny()
    grads = meta_gradient(alg, meta, TaskBatch.stack([task])).grads

    def value(p):
        with torch.enable_grad():  # the training objective: fresh model, 3 steps on the images, loss on the real batch
            return float(alg.task_objective(p, task).objective.detach())

    eps, fd, an = 1e-6, [], []
    for name in (IMAGES, LOG_LR):
        for i in range(meta[name].numel()):
            plus = {k: v.detach().clone() for k, v in meta.items()}
            minus = {k: v.detach().clone() for k, v in meta.items()}
            plus[name].view(-1)[i] += eps
            minus[name].view(-1)[i] -= eps
            fd.append((value(plus) - value(minus)) / (2 * eps))
            an.append(float(grads[name].view(-1)[i]))
    fd_t, an_t = torch.tensor(fd), torch.tensor(an)
    assert fd_t.norm() > 1e-3 and abs(fd[-1]) > 1e-4  # the images and the learning rate both matter
    assert float((fd_t - an_t).norm() / fd_t.norm()) < 1e-6


def test_fresh_initialisations_are_a_function_of_the_task_alone():
    alg, meta, task = _tiny()
    template = dict(alg.f.model.named_parameters())
    a, b = fresh_init(template, task_seed(task)), fresh_init(template, task_seed(task))
    other = Task(task.support_x, task.support_y, task.query_x + 1, task.query_y)
    c = fresh_init(template, task_seed(other))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["head.weight"], c["head.weight"])
    bound = 1 / template["head.weight"].shape[1] ** 0.5
    assert float(a["head.weight"].abs().max()) <= bound and float(a["head.bias"].abs().max()) <= bound


def _spec(extra=None, **algorithm):
    return parse_spec(
        {
            **(extra or {}),
            "name": "distill",
            "model": {"name": "conv4", "hidden": 16},
            "data": {
                "source": "noisy_labels",
                "ways": 5,
                "label_noise": 0,
                "train_per_class": 60,
                "meta_per_class": 2,
                "meta_batch_size": 10,
                "test_per_class": 20,
                "batch": 50,
                "noise": 2.0,
            },
            "algorithm": {"name": "distill", "inner": {"steps": 3}, **algorithm},
            "outer": {"optimizer": "adam", "lr": 0.05, "meta_batch": 1},
            "cluster": {"address": "inline"},
        }
    )


def test_a_short_distillation_beats_as_many_random_real_images_at_their_best_learning_rate():
    """One image per class, 120 meta-steps (about 40 s on a loaded 2-core CPU; at 60 steps the best baseline still
    won). The baseline trains the same fresh models the same 3 steps on one random real image per class, at each of
    three learning rates; all are scored on 10 slices of the 100 test images."""
    spec = _spec()
    coord, pool = Coordinator(spec), InlinePool(spec)
    for step in range(120):
        coord.apply(backprop(spec, pool, step, coord.published()))
    distilled = evaluate(pool, coord.published(), spec, 10, "test")["test/accuracy"]
    baselines = {}
    for lr in (0.3, 1.0, 3.0):
        other = _spec(inner={"steps": 3, "lr": lr})
        baselines[lr] = evaluate(InlinePool(other), coord.published(), other, 10, "test")["test/baseline_accuracy"]
    assert distilled > max(baselines.values()) + 0.1, (distilled, baselines)


@pytest.mark.parametrize(
    "patch, reason",
    [
        ({"inner": {"first_order": True}}, "inner.first_order false"),
        ({"inner": {"steps": 0}}, "inner.steps >= 1"),
        ({"distill": {"images_per_class": 3}}, "meta_per_class >= images_per_class"),
        ({"distill": {"shape": [3, 28, 28]}}, "is not the data's example shape"),
    ],
)
def test_meaningless_distill_combinations_are_refused_with_a_reason(patch, reason):
    with pytest.raises(SpecError, match=reason):
        _spec(**patch)


def test_distill_needs_clean_labelled_many_shot_data():
    with pytest.raises(SpecError, match="data.label_noise 0"):
        parse_spec({"model": {"name": "conv4"}, "data": {"source": "noisy_labels"}, "algorithm": {"name": "distill"}})
    with pytest.raises(SpecError, match="need data.source 'noisy_labels'"):
        parse_spec({"algorithm": {"name": "distill"}})


def test_metascale_run_then_export_writes_the_distilled_set_as_npz(tmp_path):
    """The job runs on the ordinary loop (checkpoints included), and the export is plain NumPy arrays."""
    spec = _spec(
        {
            "checkpoint": {"dir": str(tmp_path / "ckpt")},
            "logging": {"wandb": {"mode": "disabled"}, "progress": False},
            "eval": {"every": 0, "final_episodes": 2},
        }
    )
    spec = spec.model_copy(update={"outer": spec.outer.model_copy(update={"steps": 2})})
    result = train(spec)
    path = tmp_path / "job.yaml"
    path.write_text(dump_spec(spec))
    out = export_model(str(path), str(tmp_path / "set.npz"))
    assert out["step"] == 2 and "final/baseline_accuracy" in result
    with np.load(tmp_path / "set.npz") as f:
        assert f["images"].shape == (5, 1, 28, 28) and list(f["labels"]) == [0, 1, 2, 3, 4]
        state = checkpoint.load_latest(str(tmp_path / "ckpt"))[1]
        assert np.array_equal(f["images"], state["params"][IMAGES].numpy())
        assert float(f["inner_lr"]) == pytest.approx(float(state["params"][LOG_LR].exp()))
    with pytest.raises(MetascaleError, match="exports as a .npz"):
        export_model(str(path), str(tmp_path / "set.safetensors"))


def test_the_distill_job_validates():
    assert load_spec("jobs/glyphs-distill.yaml").algorithm.name == "distill"
    assert np.prod(load_spec("jobs/glyphs-distill.yaml").algorithm.distill.shape) == 28 * 28
